"""Torch reference for heterogeneous multi-LoRA (the SGMV shrink/expand pair of Punica/S-LoRA).

Layout, shared with the Triton kernels:
- The batch's tokens are flattened to `x[T, in]` and ordered so that all tokens of one adapter
  form one contiguous segment. `LoRABatch` lists the segments; tokens with no adapter belong to
  no segment and get no LoRA term.
- For each (layer, module) the device-resident adapters live in stacked slot buffers:
  `lora_a[num_slots, max_rank, in]` and `lora_b[num_slots, out, max_rank]`, with the adapter's
  scaling (alpha/r or alpha/sqrt(r)) already folded into B. Rows beyond an adapter's rank are zero.
- Compute is not padded to `max_rank`: each segment runs at its own rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    """The adapter segments of one forward pass."""

    seg_indptr: torch.Tensor  # int64 [S+1], segment starts + the last end (cannot express gaps)
    seg_slot: torch.Tensor  # int64 [S], device slot of each segment
    seg_rank: torch.Tensor  # int64 [S], rank each segment computes at
    segments: list[tuple[int, int, int, int]]  # (start, end, slot, rank) as Python ints: no syncs
    max_rank: int  # largest seg_rank, bounds the kernels' rank loop
    # Explicit token range of each segment: tokens between one segment's end and the next one's
    # start have no adapter. The Triton kernels read these (not seg_indptr). Filled from
    # `segments` when not given, so the older constructor call keeps working.
    seg_start: torch.Tensor | None = None  # int64 [S]
    seg_end: torch.Tensor | None = None  # int64 [S]
    max_seg_len: int = -1  # longest end - start, sizes the kernels' token-tile grid axis

    def __post_init__(self) -> None:
        if self.seg_start is None or self.seg_end is None:
            dev = self.seg_slot.device
            self.seg_start = torch.tensor([s for s, _, _, _ in self.segments], dtype=torch.int64, device=dev)
            self.seg_end = torch.tensor([e for _, e, _, _ in self.segments], dtype=torch.int64, device=dev)
        if self.max_seg_len < 0:
            self.max_seg_len = max((e - s for s, e, _, _ in self.segments), default=0)

    @classmethod
    def build(cls, segments: list[tuple[int, int, int, int]], device: torch.device) -> "LoRABatch":
        segments = [(int(s), int(e), int(sl), int(r)) for s, e, sl, r in segments]
        starts = [s for s, _, _, _ in segments]
        indptr = starts + [segments[-1][1]] if segments else [0]
        # Gaps (no-adapter tokens) between segments are allowed, so the kernels read explicit
        # (start, end) pairs. start/end/slot/rank travel to the device as one [4, S] tensor (one
        # host-to-device copy); the per-field tensors are row views of it.
        meta = torch.tensor([starts, [e for _, e, _, _ in segments], [sl for _, _, sl, _ in segments],
                             [r for _, _, _, r in segments]], dtype=torch.int64, device=device).reshape(4, -1)
        return cls(
            seg_indptr=torch.tensor(indptr, dtype=torch.int64, device=device),
            seg_slot=meta[2],
            seg_rank=meta[3],
            segments=segments,
            max_rank=max((r for _, _, _, r in segments), default=0),
            seg_start=meta[0],
            seg_end=meta[1],
            max_seg_len=max((e - s for s, e, _, _ in segments), default=0),
        )

    @property
    def empty(self) -> bool:
        return not self.segments


def add_lora_ref(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 batch: LoRABatch) -> torch.Tensor:
    """y[t] += B_slot(t) @ (A_slot(t) @ x[t]) for every token t inside a segment. In place."""
    for start, end, slot, rank in batch.segments:
        shrunk = x[start:end] @ lora_a[slot, :rank].t()  # [n, rank]
        # addmm_ adds in place without a temporary [n, out] product: 22% less time per
        # projection at 32 segments on the CPU, 6% off a whole decode step (see the notes).
        y[start:end].addmm_(shrunk.to(y.dtype), lora_b[slot, :, :rank].t().to(y.dtype))
    return y


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """h[T, max_rank] = A_slot(t) @ x[t] (fp32), zero outside segments and beyond each rank."""
    out = torch.zeros(x.shape[0], max(batch.max_rank, 1), dtype=torch.float32, device=x.device)
    for start, end, slot, rank in batch.segments:
        out[start:end, :rank] = x[start:end].float() @ lora_a[slot, :rank].float().t()
    return out


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """y[t] += B_slot(t) @ h[t, :rank]. In place."""
    for start, end, slot, rank in batch.segments:
        y[start:end] += (h[start:end, :rank] @ lora_b[slot, :, :rank].float().t()).to(y.dtype)
    return y
