"""Load a Hugging Face checkpoint folder into the engine's own model (no transformers model class)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.engine.model.config import ModelConfig, UnsupportedModelError
from loraplex.engine.model.llama import LlamaForCausalLM
from loraplex.engine.model.quant import quantize_module_weight, weight_bytes

# Checkpoint keys that carry nothing the engine uses (recomputed buffers).
IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{model_dir} has no *.safetensors weights (pickled .bin files are refused)")
    return files


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device, num_lora_slots: int = 0,
               max_lora_rank: int = 0, max_positions: int | None = None) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, num_lora_slots, max_lora_rank, max_positions).to(dtype)
    # Materialise straight on the target device in the target dtype: parameters uninitialised
    # (each is filled once below, cast on the way), buffers (LoRA slots, rope tables)
    # recomputed. No full-precision copy of the model ever exists: on a GPU the peak is the
    # model in its dtype plus one checkpoint tensor on the host.
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty() makes a separate tensor for each tied parameter
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    fp8: dict[str, dict[str, torch.Tensor]] = {}  # module name -> its fp8 "weight" and "scale_inv"
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for file_key in f.keys():
                if file_key.endswith(IGNORED_KEY_SUFFIXES):
                    continue
                if cfg.fp8_block and file_key.endswith(".weight_scale_inv"):
                    fp8.setdefault(file_key.removesuffix(".weight_scale_inv"), {})["scale_inv"] = f.get_tensor(file_key)
                    continue
                for key, tensor in split_fused(file_key, lambda: f.get_tensor(file_key), cfg):
                    if key not in params:
                        raise UnsupportedModelError(f"unexpected weight {file_key!r} in {file.name}")
                    if tuple(tensor.shape) != tuple(params[key].shape):
                        raise UnsupportedModelError(f"weight {key!r} has shape {tuple(tensor.shape)}, expected {tuple(params[key].shape)}")
                    if tensor.dtype == torch.float8_e4m3fn and not cfg.fp8_block:
                        raise UnsupportedModelError(f"weight {key!r} is fp8, but config.json has no fp8 quantization_config")
                    if tensor.dtype == torch.float8_e4m3fn and cfg.fp8_block and key.endswith(".weight"):
                        fp8.setdefault(key.removesuffix(".weight"), {})["weight"] = tensor.to(device)
                        loaded.add(key)
                        continue
                    with torch.no_grad():
                        params[key].copy_(tensor)  # casts to the model's dtype; host to device
                    loaded.add(key)
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")  # shares embed_tokens.weight
    missing = sorted(set(params) - loaded)
    if missing:
        raise UnsupportedModelError(f"checkpoint {model_dir} lacks weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, parts in fp8.items():
        _quantize(model, name, parts, cfg, dtype, device)
    model.weight_bytes, model.weight_bytes_unquantized = weight_bytes(model, dtype)
    _reset_buffers(model, cfg, max_positions, device)
    return model.eval().requires_grad_(False)


def split_fused(key: str, get_tensor, cfg: ModelConfig):
    """(engine key, tensor) for one checkpoint tensor: itself, or for a fused module (Phi-3's
    `qkv_proj`, `gate_up_proj`) its row blocks under the engine's per-projection names."""
    parts = key.split(".")
    fused = cfg.fused_modules()
    if len(parts) < 2 or parts[-2] not in fused:
        return [(key, get_tensor())]
    names = fused[parts[-2]]
    sizes = [cfg.projection_shapes()[n][1] for n in names]
    tensor = get_tensor()
    if tensor.shape[0] != sum(sizes):
        raise UnsupportedModelError(f"weight {key!r} has {tensor.shape[0]} rows, expected {sum(sizes)} ({' + '.join(names)})")
    prefix = ".".join(parts[:-2])
    return [(f"{prefix}.{n}.{parts[-1]}", t.contiguous()) for n, t in zip(names, tensor.split(sizes))]


def _quantize(model: LlamaForCausalLM, name: str, parts: dict, cfg: ModelConfig, dtype: torch.dtype,
              device: torch.device) -> None:
    if set(parts) != {"weight", "scale_inv"}:
        raise UnsupportedModelError(f"{name}: an fp8 checkpoint needs both weight (float8_e4m3fn) and weight_scale_inv")
    weight, scale_inv = parts["weight"], parts["scale_inv"]
    (out_features, in_features), (bo, bi) = weight.shape, cfg.fp8_block
    want = (-(-out_features // bo), -(-in_features // bi))
    if tuple(scale_inv.shape) != want:
        raise UnsupportedModelError(f"{name}.weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} for blocks {bo}x{bi}")
    quantize_module_weight(model.get_submodule(name), weight, scale_inv.float().to(device), cfg.fp8_block, dtype)


def _reset_buffers(model: LlamaForCausalLM, cfg: ModelConfig, max_positions: int | None, device: torch.device) -> None:
    model.reset_rope(device)  # stays fp32
    for group in model.lora_groups():
        for buf in group.buffers():
            buf.zero_()
