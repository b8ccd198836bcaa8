"""Load a Hugging Face checkpoint folder into the engine's own model (no transformers model class)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.engine.model.config import ModelConfig, UnsupportedModelError
from loraplex.engine.model.llama import LlamaForCausalLM
from loraplex.engine.model.parallel import (TensorParallel, build_parallel_model, check_tensor_parallel, fp8_scale_shape,
                                            read_shard)
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
               max_lora_rank: int = 0, max_positions: int | None = None,
               tp: TensorParallel | None = None) -> LlamaForCausalLM:
    """`tp`: build and load only this rank's shard (parallel.py); None: the whole model."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        if tp is None:
            model = LlamaForCausalLM(cfg, num_lora_slots, max_lora_rank, max_positions).to(dtype)
        else:
            check_tensor_parallel(cfg, tp.size)
            model = build_parallel_model(cfg, tp, num_lora_slots, max_lora_rank, max_positions).to(dtype)
        # Quantized projections get their fp8 weight and scales before materialising: no
        # full-precision copy of them is ever allocated either.
        fp8 = _prepare_fp8(model, model_dir, cfg, dtype, tp) if cfg.fp8_block else set()
    # Materialise straight on the target device in the target dtype: parameters uninitialised
    # (each is filled once below, cast on the way), buffers (LoRA slots, rope tables)
    # recomputed. No full-precision copy of the model ever exists: on a GPU the peak is the
    # model in its dtype plus one checkpoint tensor on the host.
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty() makes a separate tensor for each tied parameter
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for file_key in f.keys():
                if file_key.endswith(IGNORED_KEY_SUFFIXES):
                    continue
                if cfg.fp8_block and file_key.endswith(".weight_scale_inv"):
                    dequant = model.get_submodule(file_key.removesuffix(".weight_scale_inv")).parametrizations.weight[0]
                    scale = f.get_tensor(file_key) if tp is None else read_shard(f, file_key, cfg, tp)[0][1]
                    with torch.no_grad():
                        dequant.scale_inv.copy_(scale)
                    continue
                pairs = (split_fused(file_key, lambda: f.get_tensor(file_key), cfg) if tp is None
                         else read_shard(f, file_key, cfg, tp))
                for key, tensor in pairs:
                    if key.removesuffix(".weight") in fp8:
                        if tensor.dtype != torch.float8_e4m3fn:
                            raise UnsupportedModelError(f"weight {key!r} has a weight_scale_inv but is {tensor.dtype}, not float8_e4m3fn")
                        key = key.removesuffix("weight") + "parametrizations.weight.original"
                    elif tensor.dtype == torch.float8_e4m3fn:
                        what = "has no weight_scale_inv" if cfg.fp8_block else "is fp8, but config.json has no fp8 quantization_config"
                        raise UnsupportedModelError(f"weight {key!r} {what}")
                    if key not in params:
                        raise UnsupportedModelError(f"unexpected weight {file_key!r} in {file.name}")
                    if tuple(tensor.shape) != tuple(params[key].shape):
                        raise UnsupportedModelError(f"weight {key!r} has shape {tuple(tensor.shape)}, expected {tuple(params[key].shape)}")
                    with torch.no_grad():
                        params[key].copy_(tensor)  # casts to the model's dtype; host to device
                    loaded.add(key)
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")  # shares embed_tokens.weight
    missing = sorted(set(params) - loaded)
    if missing:
        raise UnsupportedModelError(f"checkpoint {model_dir} lacks weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
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


def _prepare_fp8(model: LlamaForCausalLM, model_dir: Path, cfg: ModelConfig, dtype: torch.dtype,
                 tp: TensorParallel | None = None) -> set[str]:
    """Make every module whose checkpoint has a `weight_scale_inv` an fp8 one (on the meta
    device, before materialising); returns their names. Under tensor parallelism the module is
    the rank's shard (its scales: the shard's whole blocks, parallel.read_shard)."""
    names = set()
    bo, bi = cfg.fp8_block
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if not key.endswith(".weight_scale_inv"):
                    continue
                name = key.removesuffix(".weight_scale_inv")
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise UnsupportedModelError(f"unexpected weight {key!r} in {file.name}") from None
                out_features, in_features = module.weight.shape
                want, got = (-(-out_features // bo), -(-in_features // bi)), tuple(f.get_slice(key).get_shape())
                expect = want if tp is None else fp8_scale_shape(cfg, name)
                if got != expect:
                    raise UnsupportedModelError(f"{key} has shape {got}, expected {expect} for blocks {bo}x{bi}")
                quantize_module_weight(module, torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                       torch.empty(want, dtype=torch.float32), cfg.fp8_block, dtype)
                names.add(name)
    return names


def _reset_buffers(model: LlamaForCausalLM, cfg: ModelConfig, max_positions: int | None, device: torch.device) -> None:
    model.reset_rope(device)  # stays fp32 (a shard's config keeps head_dim and the rope settings)
    for group in model.lora_groups():
        for buf in group.buffers():
            buf.zero_()
