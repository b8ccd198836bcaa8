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
    # Admission order across tenants (scheduler.py rule 4): "vtc", the tenant with the least
    # weighted service first (docs/engine.md "Fairness across tenants"), or "fcfs", arrival order.
    tenant_scheduling: str = "vtc"
    enable_prefix_caching: bool = True  # share full KV blocks of equal prefixes (per adapter)
    seed: int = 0
    num_threads: int | None = None  # torch CPU threads; oversubscribed cores slow matmuls many-fold
    tensor_parallel_size: int = 1  # ranks the model is split over (rank 0 + N-1 worker processes)
    tensor_parallel_timeout: float = 60.0  # seconds a rank waits in a collective / for the workers to join
    # adapters
    adapter_source: str = "local"
    adapter_dir: str | None = None
    adapter_cache_dir: str | None = None
    adapter_s3_prefix: str | None = None  # s3://bucket/prefix/: where unregistered names live for source s3
    dynamic_adapters: str = "auto"  # unregistered names: on | off | admin; auto = on for local, off for hub/s3
    max_concurrent_adapter_loads: int = 4  # dynamic name resolutions (lookups, downloads) at once
    adapter_negative_cache_seconds: float = 10.0  # how long a name that was not found stays "not found"
    adapter_negative_cache_size: int = 4096
    max_dynamic_adapters: int = 1024  # registry rows for dynamic names that hold nothing yet
    # The operator's catalog (catalog_source.py): when set, THE source of unregistered names (the
    # default source is then used only for --preload-adapters); its manifests are re-checked there
    # after ttl seconds, so a tenant change or a deletion reaches pods the adapter is not placed on.
    adapter_catalog_url: str | None = None
    adapter_catalog_token_file: str | None = None  # the admin token presented to the catalog
    adapter_catalog_ttl_seconds: float = 30.0
    max_active_adapters: int = 8  # device slots (a cap; a device byte budget may allow fewer)
    adapter_device_bytes: int | None = None  # device tier budget: slots = budget // bytes per slot
    adapter_memory_fraction: float | None = None  # ... or this share of device memory (CPU: of RAM)
    max_cpu_adapters: int = 64  # host-RAM copies (a cap beside the byte budget)
    adapter_host_bytes: int = 4 << 30  # host tier budget
    adapter_disk_bytes: int | None = None  # disk tier budget for Hub/S3 downloads (None: unbounded)
    adapter_merged_bytes: int = 1 << 30  # RAM for merged adapters (merged_cache.py), beside the host tier
    max_concurrent_merges: int = 2  # merged_adapters built at once; more get 429 with Retry-After
    # A request whose adapter is still not loaded (in RAM or a slot) this long after it arrived
    # ends with 503 adapter_load_timeout instead of waiting on.
    adapter_wait_timeout_seconds: float = 60.0
    adapter_fairness_seconds: float = 0.0  # a request starved of a slot this long stops others taking slots
    max_lora_rank: int = 64
    preload_adapters: list[str] = field(default_factory=list)
    adapter_load_workers: int = 2

    def dynamic_adapter_policy(self) -> str:
        if self.dynamic_adapters not in ("auto", "on", "off", "admin"):
            raise ValueError(f"--dynamic-adapters must be auto, on, off or admin, not {self.dynamic_adapters!r}")
        if self.dynamic_adapters == "auto":
            return "on" if self.adapter_source == "local" or self.adapter_catalog_url else "off"
        return self.dynamic_adapters

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
