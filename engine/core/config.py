"""Engine settings: one dataclass, filled from the CLI (flags follow LoRAX and vLLM)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineConfig:
    model_id: str
    revision: str | None = None
    served_model_name: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.9  # CUDA: share of the GPU memory for weights + activations + KV cache
    cpu_kv_cache_bytes: int = 2 << 30  # CPU: cap on the default cache size
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting: int = 1024  # bounded queue: beyond it requests get 429
    enable_prefix_caching: bool = True  # share full KV blocks of equal prefixes (per adapter)
    seed: int = 0
    num_threads: int | None = None  # torch CPU threads; oversubscribed cores slow matmuls many-fold
    # adapters
    adapter_source: str = "local"
    adapter_dir: str | None = None
    adapter_cache_dir: str | None = None
    max_active_adapters: int = 8  # device slots
    max_cpu_adapters: int = 64  # host-RAM copies
    max_lora_rank: int = 64
    preload_adapters: list[str] = field(default_factory=list)
    adapter_load_workers: int = 2

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
        if self.dtype != "auto":
            if self.dtype not in DTYPES:
                raise ValueError(f"--dtype must be auto or one of {sorted(DTYPES)}, not {self.dtype!r}")
            return DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32  # CPU half-precision matmuls are slow and lose accuracy
        return torch.float16 if checkpoint_dtype == "float16" else torch.bfloat16
