"""Torch reference for heterogeneous multi-LoRA (the SGMV shrink/expand pair of Punica/S-LoRA).

The batch's segments (`LoRABatch`) and the slot buffers' layout (`LoRASlots`), shared with the
Triton kernels, are in `lora_batch.py`. Here:
- Compute is not padded to `max_rank`: each segment runs at its own rank.
- The model calls a group's shrink once and then each projection's expand right after that
  projection's base matmul (`shrink_group_*`, `expand_group_*`), so the expand adds into an
  output that is still in cache. What a shrink returns is each implementation's own business;
  only its own expand reads it. This reference returns, per segment, h^T = A x^T
  (`[rank * P, n]`, A as BLAS's plain left operand): projection p's part is then the rows
  `h^T[p::P]`, each row contiguous, which BLAS reads in place as the transposed left operand
  of the expand. With h = x A^T instead, `h[:, p::P]` has no unit stride and was copied before
  every expand. Measured on the CPU (SmolLM2-135M shapes, batch 32, rank 4, 30 layers, 1
  thread, all seven projections): the LoRA work of a step went from 6.4-7.1 ms (h = x A^T,
  all expands after the group's matmuls) to 4.8-5.1 ms (h^T) and 4.2 ms (h^T, each expand
  right after its matmul).
"""
from __future__ import annotations

import torch

from loraplex.kernels.lora_batch import LoRABatch, LoRASlots


def shrink_group_ref(x: torch.Tensor, slots: LoRASlots, batch: LoRABatch) -> list[torch.Tensor]:
    """The group's shrink: per segment h^T = a[slot, :rank*P] @ x[start:end]^T, `[rank * P, n]`
    (row j * P + p is rank j of projection p), in the model's dtype. Read by `expand_group_ref`."""
    T = x.shape[0]
    # One adapter on the whole batch (end - start == T): no row slicing at all.
    return [torch.mm(slots.segment_weights(slot, rank)[0], (x if end - start == T else x[start:end]).t())
            for start, end, slot, rank in batch.segments]


def expand_group_ref(y: torch.Tensor, h: list[torch.Tensor], slots: LoRASlots, p: int,
                     batch: LoRABatch) -> torch.Tensor:
    """y[t] += h_p[t] @ b_p[slot(t), :rank] for projection p of the group, every token t inside a
    segment; `h` from `shrink_group_ref`. In place; returns y."""
    P, T = slots.num_proj, y.shape[0]
    for (start, end, slot, rank), ht in zip(batch.segments, h):
        # addmm_ adds in place without a temporary [n, out] product; h^T[p::P].t() is [n, rank]
        # with unit stride along n, which BLAS takes as a transposed operand without a copy.
        (y if end - start == T else y[start:end]).addmm_(ht[p::P].t(), slots.segment_weights(slot, rank)[1][p])
    return y


def add_lora_ref(ys: list[torch.Tensor | None], x: torch.Tensor, slots: LoRASlots,
                 batch: LoRABatch) -> list[torch.Tensor | None]:
    """ys[p][t] += B_p,slot(t) @ (A_p,slot(t) @ x[t]) for every token t inside a segment, for each
    projection p of the group whose `ys[p]` is not None. In place.

    x, ys and the slot buffers share one dtype (the model's). Per segment: one shrink GEMM for
    the whole group, then one addmm_ per output slice.
    """
    h = shrink_group_ref(x, slots, batch)
    for p, y in enumerate(ys):
        if y is not None:
            expand_group_ref(y, h, slots, p, batch)
    return ys


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, batch: LoRABatch, num_proj: int = 1) -> torch.Tensor:
    """h[T, max_rank * P] (fp32) = x[t] @ a[slot(t), :rank*P].T; zero outside segments and beyond
    each segment's rank * P columns. `a` is a group's `[num_slots, max_rank * P, in]` buffer."""
    out = torch.zeros(x.shape[0], max(batch.max_rank * num_proj, 1), dtype=torch.float32, device=x.device)
    for start, end, slot, rank in batch.segments:
        out[start:end, :rank * num_proj] = x[start:end].float() @ a[slot, :rank * num_proj].float().t()
    return out


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """y[t] += h[t, :rank] @ b[slot(t), :rank]. In place. `h` is one projection's part of the
    shrink output (for a group, the strided view `h[:, p::P]`); `b` is `[num_slots, max_rank, out]`."""
    for start, end, slot, rank in batch.segments:
        y[start:end] += (h[start:end, :rank].float() @ b[slot, :rank].float()).to(y.dtype)
    return y
