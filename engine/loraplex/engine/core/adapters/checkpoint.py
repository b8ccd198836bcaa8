"""Parse and validate a PEFT LoRA checkpoint against the base model.

The result, `AdapterWeights`, is what the cache tiers hold: per (layer, module) an A [r, in] and
a B [out, r] with the LoRA scaling already folded into B.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loraplex.engine.core.adapters.peft_config import (AdapterFormatError, check_adapter_config, config_bytes,
                                                       parse_adapter_config, read_adapter_config)
from loraplex.engine.model.config import ModelConfig

__all__ = ["AdapterFormatError", "AdapterWeights", "check_checkpoint_folder", "load_adapter", "read_adapter_config"]

KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
          "qkv_proj": "self_attn", "gate_up_proj": "mlp"}  # the last two: fused bases (Phi-3)


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


def _weights_file(adapter_dir: Path) -> Path:
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise AdapterFormatError("adapter_model.bin (pickle) is refused; convert the adapter to safetensors")
        raise AdapterFormatError(f"missing adapter_model.safetensors in {adapter_dir.name}")
    return file


def check_checkpoint_folder(adapter_dir: Path) -> None:
    """The cheap part of validation (no tensors read): enough to tell a PEFT LoRA checkpoint
    from any other folder before the adapter is registered."""
    check_adapter_config(read_adapter_config(adapter_dir))
    _weights_file(adapter_dir)


def _check_pin(what: str, digest: str, pinned: str | None) -> None:
    """The manifest's digest of a file against the sha256 of the very bytes that are parsed
    (never a second read of the file: one swapped after the check changes nothing)."""
    if pinned is not None and digest != pinned:
        raise AdapterFormatError(f"sha256 mismatch for {what}: expected {pinned}, got {digest}")


def load_adapter(adapter_dir: Path, base: ModelConfig, max_rank: int, dtype: torch.dtype,
                 sha256: str | None = None, config_sha256: str | None = None) -> AdapterWeights:
    """Read, validate and scale one adapter; raises AdapterFormatError with a precise message.
    sha256 / config_sha256: the digests the manifest pins for the weights / the config."""
    cfg = config_bytes(adapter_dir)
    _check_pin("adapter_config.json", hashlib.sha256(cfg).hexdigest(), config_sha256)
    scaling = check_adapter_config(parse_adapter_config(cfg))
    file = _weights_file(adapter_dir)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise AdapterFormatError(f"adapter_model.safetensors is unreadable: {exc}") from None
    weights_digest = hashlib.sha256(data).digest()
    _check_pin("adapter_model.safetensors", weights_digest.hex(), sha256)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise AdapterFormatError(f"adapter_model.safetensors is unreadable: {exc}") from None
    del data
    digest = hashlib.sha256(cfg + weights_digest)  # as before: sha256(config bytes + sha256(weights))

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
        expected_r = scaling.rank(module_key)
        if expected_r != r:
            raise AdapterFormatError(f"{name}: weights have rank {r}, adapter_config says {expected_r}")
        scale = scaling.scale(module_key, r)
        a, b = a.to(dtype).contiguous(), (b.float() * scale).to(dtype)
        # After the scaling and the cast to the serving dtype: a finite B times a large alpha, or
        # a value past the dtype's range, is as bad as a NaN in the file.
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterFormatError(f"{name}: weights contain NaN or infinity once scaled by the LoRA scaling "
                                     f"{scale:g} and cast to {str(dtype).removeprefix('torch.')}")
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
