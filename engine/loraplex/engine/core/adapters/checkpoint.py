"""Parse and validate a PEFT LoRA checkpoint against the base model.

The result, `AdapterWeights`, is what the cache tiers hold: per (layer, module) an A [r, in] and
a B [out, r] with the LoRA scaling already folded into B.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loraplex.engine.model.config import ModelConfig

KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
          "qkv_proj": "self_attn", "gate_up_proj": "mlp"}  # the last two: fused bases (Phi-3)


class AdapterFormatError(ValueError):
    """The checkpoint is not a LoRA adapter this engine can apply to this base; says why."""


@dataclass
class AdapterWeights:
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A, B*scale)
    rank: int  # the largest rank over the modules: what the kernels compute at
    target_modules: tuple[str, ...]
    nbytes: int
    digest: str = ""  # sha256 of adapter_config.json + the weights file: the prefix cache's adapter identity
    # (layer, module) -> the LoRA scaling folded into B (alpha / r, or alpha / sqrt(r) with rslora);
    # merges (merge.py) need the unscaled B back.
    scales: dict[tuple[int, str], float] = field(default_factory=dict)


def _pattern_value(patterns: dict, module_key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_key):
            return value
    return default


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise AdapterFormatError(f"missing adapter_config.json in {adapter_dir.name}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"adapter_config.json is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError("adapter_config.json must hold a JSON object")
    return cfg


def check_adapter_config(cfg: dict) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"unsupported peft_type {cfg.get('peft_type')!r}: only LORA adapters are served")
    if cfg.get("use_dora"):
        raise AdapterFormatError("DoRA adapters (use_dora: true) are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterFormatError(f"modules_to_save {cfg['modules_to_save']} is not supported: an adapter may only add LoRA to the projections")
    if cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"LoRA bias {cfg['bias']!r} is not supported (only bias: none)")
    for flag in ("use_qalora", "lora_bias"):
        if cfg.get(flag):
            raise AdapterFormatError(f"{flag} is not supported")


def check_checkpoint_folder(adapter_dir: Path) -> None:
    """The cheap part of validation (no tensors read): enough to tell a PEFT LoRA checkpoint
    from any other folder before the adapter is registered."""
    cfg = read_adapter_config(adapter_dir)
    check_adapter_config(cfg)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise AdapterFormatError("adapter_model.bin (pickle) is refused; convert the adapter to safetensors")
        raise AdapterFormatError(f"missing adapter_model.safetensors in {adapter_dir.name}")


def load_adapter(adapter_dir: Path, base: ModelConfig, max_rank: int, dtype: torch.dtype) -> AdapterWeights:
    """Read, validate and scale one adapter; raises AdapterFormatError with a precise message."""
    cfg = read_adapter_config(adapter_dir)
    check_adapter_config(cfg)
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise AdapterFormatError("adapter_model.bin (pickle) is refused; convert the adapter to safetensors")
        raise AdapterFormatError(f"missing adapter_model.safetensors in {adapter_dir.name}")
    try:
        tensors = load_file(str(file))
        digest = hashlib.sha256((adapter_dir / "adapter_config.json").read_bytes())
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"adapter_model.safetensors is unreadable: {exc}") from None

    shapes = base.projection_shapes()
    # A fused module's LoRA (Phi-3's qkv_proj, gate_up_proj): delta W = B A over the stacked
    # rows, so each part gets the same A and its own rows of B.
    fused = base.fused_modules()
    for name, parts in fused.items():
        shapes[name] = (shapes[parts[0]][0], sum(shapes[p][1] for p in parts))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY.match(key)
        if not m:
            what = "embeddings/lm_head" if ("embed" in key or "lm_head" in key) else "this module"
            raise AdapterFormatError(f"weight {key!r}: LoRA on {what} is not supported; targets must be among {', '.join(shapes)}")
        layer, parent, module, ab = int(m[1]), m[2], m[3], m[4]
        if module not in shapes or PARENT[module] != parent:
            raise AdapterFormatError(f"weight {key!r} targets {parent}.{module}; targets must be among {', '.join(shapes)}")
        if layer >= base.num_layers:
            raise AdapterFormatError(f"weight {key!r} is for layer {layer}, but the base model has {base.num_layers} layers: adapter built for another base")
        pairs.setdefault((layer, module), {})[ab] = t
    if not pairs:
        raise AdapterFormatError("adapter_model.safetensors holds no LoRA weights")

    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    scales: dict[tuple[int, str], float] = {}
    for (layer, module), ab in sorted(pairs.items()):
        name = f"layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{name}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a LoRA pair")
        r = a.shape[0]
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise AdapterFormatError(
                f"{name}: adapter shapes A {tuple(a.shape)} B {tuple(b.shape)} do not fit the base projection "
                f"({fan_in} -> {fan_out}): adapter built for another base")
        if r > max_rank:
            raise AdapterFormatError(f"{name}: rank {r} exceeds --max-lora-rank {max_rank}")
        module_key = f"model.layers.{layer}.{PARENT[module]}.{module}"
        expected_r = _pattern_value(rank_pattern, module_key, r_default)
        if expected_r != r:
            raise AdapterFormatError(f"{name}: weights have rank {r}, adapter_config says {expected_r}")
        alpha = _pattern_value(alpha_pattern, module_key, alpha_default)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterFormatError(f"{name}: weights contain NaN or infinity")
        a, b = a.to(dtype).contiguous(), (b.float() * scale).to(dtype)
        if module in fused:
            for part, rows in zip(fused[module], b.split([shapes[p][1] for p in fused[module]])):
                weights[(layer, part)] = (a, rows.contiguous())
                scales[(layer, part)] = scale
        else:
            weights[(layer, module)] = (a, b.contiguous())
            scales[(layer, module)] = scale
    return AdapterWeights(
        weights=weights,
        rank=max(a.shape[0] for a, _ in weights.values()),
        target_modules=tuple(sorted({m for _, m in weights})),
        nbytes=sum(a.nbytes + b.nbytes for a, b in weights.values()),
        digest=digest.hexdigest(),
        scales=scales,
    )
