"""Kernel dispatch: one place decides, per device, which implementation the model calls.

- CPU: the torch references (importing this module never imports triton).
- CUDA: the Triton kernels where they exist (add_lora, paged decode attention); write_kv stays
  torch and prefill attention is the fused-SDPA path in the cache dtype (see docs/kernels.md). If triton does not import, the torch
  references, with a warning.
- `LORAPLEX_KERNELS=torch` forces the references everywhere. `LORAPLEX_KERNELS=triton` forces
  Triton; on a CPU device that means Triton's interpreter, so TRITON_INTERPRET=1 is set for the
  process if it is unset (it must be set before the kernels are defined), for tests.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from loraplex.kernels import attention_ref, fp8_ref, lora_ref

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelOps:
    name: str
    add_lora: Callable  # a group's shrink and expands in one call (tests, tools)
    lora_shrink: Callable  # (x, slots, batch) -> what this implementation's lora_expand reads
    lora_expand: Callable  # (y, shrunk, slots, p, batch) -> y, in place
    write_kv: Callable
    paged_decode_attention: Callable
    paged_prefill_attention: Callable


TORCH_OPS = KernelOps(
    name="torch",
    add_lora=lora_ref.add_lora_ref,
    lora_shrink=lora_ref.shrink_group_ref,
    lora_expand=lora_ref.expand_group_ref,
    write_kv=attention_ref.write_kv_ref,
    paged_decode_attention=attention_ref.paged_decode_attention_ref,
    paged_prefill_attention=attention_ref.paged_prefill_attention_ref,
)

_triton_ops_cache: KernelOps | None = None


def _triton_ops(device_type: str) -> KernelOps:
    global _triton_ops_cache
    if device_type == "cpu":
        # Triton runs CPU tensors only in its interpreter, chosen when a kernel is defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Imported lazily: importing triton is slow and, without a GPU, needs the interpreter.
    from loraplex.kernels import triton_attention, triton_lora

    if device_type == "cpu" and type(triton_lora._lora_shrink_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("LORAPLEX_KERNELS=triton on a CPU device needs TRITON_INTERPRET=1 before the "
                           "Triton kernels are first imported (they were compiled for a GPU)")
    if _triton_ops_cache is None:
        _triton_ops_cache = KernelOps(
            name="triton",
            add_lora=triton_lora.add_lora_triton,
            lora_shrink=triton_lora.shrink_group_triton,
            lora_expand=triton_lora.expand_group_triton,
            # Two index_copy_ calls: already one memory-bound scatter kernel each on CUDA.
            write_kv=attention_ref.write_kv_ref,
            paged_decode_attention=triton_attention.paged_decode_attention_triton,
            # Per-sequence gather + SDPA in the cache dtype (flash / memory-efficient backends).
            paged_prefill_attention=attention_ref.paged_prefill_attention_sdpa,
        )
    return _triton_ops_cache


def attention_for(ops: KernelOps, sliding_window: int | None, softcap: float | None) -> tuple[Callable, Callable]:
    """(prefill, decode) attention for a layer. The kernels take no sliding window or logit
    soft-cap; the layers that need them (Gemma 2/3, Mistral-style windows, Phi-3) run the torch
    references, which take both, on every device."""
    if sliding_window is None and softcap is None:
        return ops.paged_prefill_attention, ops.paged_decode_attention
    return attention_ref.paged_prefill_attention_ref, attention_ref.paged_decode_attention_ref


def fp8_dequantizer(device: torch.device | str) -> Callable:
    """Block-wise fp8 -> compute dtype: (weight, scale_inv, block, dtype) -> tensor. The Triton
    kernel wherever the Triton kernels run (CUDA; LORAPLEX_KERNELS=triton), else the reference."""
    if get_kernel_ops(device).name == "triton":
        from loraplex.kernels.triton_fp8 import dequantize_fp8_blockwise_triton

        return dequantize_fp8_blockwise_triton
    return fp8_ref.dequantize_fp8_blockwise_ref


def get_kernel_ops(device: torch.device | str) -> KernelOps:
    choice = os.environ.get("LORAPLEX_KERNELS", "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"LORAPLEX_KERNELS must be auto, torch or triton, not {choice!r}")
    device_type = torch.device(device).type
    if choice == "triton":
        return _triton_ops(device_type)
    if choice == "auto" and device_type == "cuda":
        try:
            return _triton_ops(device_type)
        except ImportError as e:  # triton missing or broken: stay correct, lose speed
            log.warning("triton unavailable (%s); using the torch kernels on CUDA", e)
    return TORCH_OPS
