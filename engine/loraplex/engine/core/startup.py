"""Engine start-up: builds what `LLMEngine` serves with, once, before the first request.

In order: the checkpoint (a local folder as is, else a Hub download), its config and tokenizer,
the model (on one device, or split over tensor-parallel worker processes started here), the
KV cache's size (given, measured by a profiling forward on CUDA, or a RAM cap on the CPU) and
the model runner. `start_up(config)` returns them as `EngineParts`; `LLMEngine` only wires
those into the scheduler, the block manager and the adapters. Nothing here runs once serving
has begun.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.engine.core.adapters.device_slots import DeviceSlots, num_slots
from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.distributed import WorkerGroup
from loraplex.engine.core.model_runner import ModelRunner, profile_kv_blocks
from loraplex.engine.core.tp_runner import ShardedDeviceSlots, TPModelRunner
from loraplex.engine.core.tp_worker import LoadSpec
from loraplex.engine.model.config import ModelConfig
from loraplex.engine.model.loader import load_model
from loraplex.engine.model.parallel import TensorParallel, check_tensor_parallel

log = logging.getLogger("loraplex.engine")


@dataclass
class EngineParts:
    """Everything start-up built, for `LLMEngine` to wire."""

    model_dir: Path
    model_config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    tokenizer: Any  # the HF fast tokenizer (LLMEngine copies it per thread)
    eos_token_ids: tuple[int, ...]
    model: Any  # rank 0's model (its shard under tensor parallelism); the adapters write its LoRA slots
    runner: ModelRunner  # or TPModelRunner
    num_kv_blocks: int
    slots_factory: Callable  # DeviceSlots, or ShardedDeviceSlots bound to the workers
    workers: WorkerGroup | None  # tensor parallel: the worker processes, else None


def resolve_model_dir(model_id: str, revision: str | None) -> Path:
    """A local folder as is; anything else is a Hub repo id, fetched (or found in the cache)."""
    path = Path(model_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))


def load_tokenizer(model_dir: Path):
    """The checkpoint's HF tokenizer; it must be a fast one: the engine decodes with tokenizers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"{model_dir} has no fast (tokenizers) tokenizer; the engine decodes with tokenizers")
    return tokenizer


def start_up(config: EngineConfig) -> EngineParts:
    """Download, load and size everything; on failure, no worker process is left running."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model_dir = resolve_model_dir(config.model_id, config.revision)
    model_config = ModelConfig.from_dir(model_dir)
    device = config.resolve_device()
    dtype = config.resolve_dtype(device, model_config.torch_dtype)
    # Sliding windows are honoured by the attention (model/attention.py): no cap needed.
    max_model_len = config.max_model_len or model_config.max_position_embeddings
    # The tokenizer before the model: a checkpoint the engine cannot decode fails before any
    # worker process starts.
    tokenizer = load_tokenizer(model_dir)
    eos_token_ids = tuple(model_config.eos_token_ids) or (
        (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())

    slots = num_slots(config, model_config, dtype, device)  # device tier: bytes -> slots
    workers = None
    if config.tensor_parallel_size > 1:
        workers, model = _start_tensor_parallel(config, model_config, model_dir, device, dtype, max_model_len, slots)
    else:
        model = load_model(model_dir, dtype, device, num_lora_slots=slots, max_lora_rank=config.max_lora_rank,
                           max_positions=max_model_len)
    try:
        num_blocks = num_kv_blocks(config, model_config, model, device, dtype, max_model_len, workers)
        if num_blocks * config.block_size < max_model_len:
            raise ValueError(f"KV cache of {num_blocks} blocks x {config.block_size} tokens cannot hold one sequence "
                             f"of max_model_len {max_model_len}; raise --num-kv-blocks or lower --max-model-len")
        if workers is None:
            runner = ModelRunner(model, num_blocks, config.block_size, device, dtype, seed=config.seed,
                                 max_num_seqs=config.max_num_seqs)
            slots_factory = DeviceSlots
        else:
            runner = _tensor_parallel_runner(config, model, num_blocks, device, dtype, workers)
            slots_factory = functools.partial(ShardedDeviceSlots, workers=workers)
    except BaseException:
        if workers is not None:
            workers.shutdown()
        raise
    return EngineParts(model_dir, model_config, device, dtype, max_model_len, tokenizer, eos_token_ids, model,
                       runner, num_blocks, slots_factory, workers)


def _start_tensor_parallel(cfg: EngineConfig, model_config: ModelConfig, model_dir: Path, device: torch.device,
                           dtype: torch.dtype, max_model_len: int, slots: int):
    """Check the split, start the workers, load every rank's shard (the workers' in parallel
    with rank 0's); returns the workers and rank 0's shard of the model."""
    check_tensor_parallel(model_config, cfg.tensor_parallel_size)  # before any process starts
    workers = WorkerGroup(cfg.tensor_parallel_size, device.type, cfg.tensor_parallel_timeout,
                          logging.getLevelName(log.getEffectiveLevel()).lower()).start()
    try:
        workers.send(("load", LoadSpec(str(model_dir), str(dtype).removeprefix("torch."), slots,
                                       cfg.max_lora_rank, max_model_len, cfg.num_threads)))
        tp = TensorParallel(0, cfg.tensor_parallel_size)
        model = load_model(model_dir, dtype, device, num_lora_slots=slots, max_lora_rank=cfg.max_lora_rank,
                           max_positions=max_model_len, tp=tp)
        workers.collect()
        return workers, model
    except BaseException:
        workers.shutdown()
        raise


def _tensor_parallel_runner(cfg: EngineConfig, model, num_blocks: int, device: torch.device, dtype: torch.dtype,
                            workers: WorkerGroup) -> TPModelRunner:
    kwargs = dict(num_blocks=num_blocks, block_size=cfg.block_size, max_num_seqs=cfg.max_num_seqs)
    workers.send(("runner", kwargs))
    runner = TPModelRunner(model, device=device, dtype=dtype, workers=workers, seed=cfg.seed, **kwargs)
    workers.collect()
    return runner


def num_kv_blocks(cfg: EngineConfig, model_config: ModelConfig, model, device: torch.device, dtype: torch.dtype,
                  max_model_len: int, workers: WorkerGroup | None = None) -> int:
    """--num-kv-blocks if given; on CUDA what a profiling forward at the largest step leaves
    free; on the CPU enough for --max-num-seqs full contexts, capped by --cpu-kv-cache-bytes."""
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    per_block = ModelRunner.kv_bytes_per_block(model_config, cfg.block_size, dtype)
    if device.type == "cuda":
        args = (cfg.block_size, cfg.kv_cache_memory_fraction, cfg.max_num_batched_tokens, cfg.max_num_seqs)
        if workers is None:
            return profile_kv_blocks(model, device, dtype, *args)
        # Every rank runs the profiling forward (it has collectives); the tightest rank decides.
        workers.send(("profile", dict(zip(("block_size", "memory_fraction", "max_num_batched_tokens",
                                           "max_num_seqs"), args))))
        mine = profile_kv_blocks(model, device, dtype, *args)
        return min([mine, *workers.collect()])
    enough = cfg.max_num_seqs * -(-max_model_len // cfg.block_size)
    return max(1, min(enough, cfg.cpu_kv_cache_bytes // per_block))
