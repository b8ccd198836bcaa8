"""The LoRA data of one forward pass that every kernel reads, the torch references and the Triton
kernels alike (`lora_ref.py`, `triton_lora.py`; docs/kernels.md has the why):

- The batch's tokens are flattened to `x[T, in]` and ordered so that all tokens of one adapter
  form one contiguous segment. `LoRABatch` lists the segments; tokens with no adapter belong to
  no segment and get no LoRA term.
- Projections that read the same input share one set of slot buffers, a `LoRASlots` group:
  q/k/v (P = 3), gate/up (P = 2), o and down alone (P = 1). One shrink serves the group; the
  expand runs once per output slice.
  - `a[num_slots, max_rank * P, in]`: the group's A matrices stacked and interleaved
    rank-major: row `j * P + p` holds row j of projection p's A. The first r ranks of all P
    projections are then the first `r * P` rows, so a rank-r segment's shrink reads and
    computes exactly its `r * P` rows (`h = x @ a[slot, :r*P].T`, one `F.linear`):
    `h[t, j * P + p]`, and projection p's part is the strided view `h[:, p::P]`.
  - `b[p][num_slots, max_rank, out_p]`: projection p's B, pre-transposed (`h @ b`, a
    contiguous `[r, out]` block per segment), with the adapter's scaling (alpha/r or
    alpha/sqrt(r)) folded in.
  - Why A is not pre-transposed too: measured on the CPU reference (batch 32, 1 thread),
    `F.linear(x, a[:r*P])` (A as BLAS's transposed operand) took 13-15 µs where
    `x @ a_t[:, :r*P]` on a pre-transposed `[in, max_rank * P]` block took 23 µs (in 576) and
    61 µs (in 1536, rank 4); for B the pre-transposed `[r, out]` block is the faster one
    (9.1 vs 9.7 µs). Both layouts read along `in` / `out` contiguously in the Triton kernels.
  - Rows/columns beyond an adapter's rank are zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoRABatch:
    """The adapter segments of one forward pass, built once per step for every layer."""

    segments: list[tuple[int, int, int, int]]  # (start, end, slot, rank) as Python ints: no syncs
    # The same as int64 device tensors, row views of one [4, S] tensor (one host-to-device copy).
    # Tokens between one segment's end and the next one's start have no adapter.
    seg_start: torch.Tensor
    seg_end: torch.Tensor
    seg_slot: torch.Tensor
    seg_rank: torch.Tensor
    max_rank: int  # largest rank, bounds the kernels' rank loop and the shrink scratch width
    max_seg_len: int  # longest end - start, sizes the kernels' token-tile grid axis
    # Bit s set when some segment uses slot s: a group tests "does any adapter of this batch
    # target me?" with one AND against its own mask (see `SlotFlags`). -1: every slot.
    slot_mask: int

    @classmethod
    def build(cls, segments: list[tuple[int, int, int, int]], device: torch.device,
              meta: torch.Tensor | None = None) -> "LoRABatch":
        """`meta`: the segments already staged on the device as int64 [4, S] (start, end, slot,
        rank rows), as the model runner's persistent buffers do; otherwise copied here."""
        segments = [(int(s), int(e), int(sl), int(r)) for s, e, sl, r in segments]
        if meta is None:
            meta = torch.tensor([[seg[i] for seg in segments] for i in range(4)], dtype=torch.int64,
                                device=device).reshape(4, -1)
        mask = 0
        for _, _, slot, _ in segments:
            mask |= 1 << slot
        return cls(segments, meta[0], meta[1], meta[2], meta[3],
                   max_rank=max((r for _, _, _, r in segments), default=0),
                   max_seg_len=max((e - s for s, e, _, _ in segments), default=0), slot_mask=mask)

    @property
    def empty(self) -> bool:
        return not self.segments


class SlotFlags(list):
    """Per slot: does the adapter there target this projection? (The adapter manager writes it.)

    A bitmask mirrors the list so that a forward asks "does any segment's adapter target this
    projection?" with one AND against `LoRABatch.slot_mask`, not a loop over segments.
    """

    def __init__(self, num_slots: int):
        super().__init__([True] * num_slots)
        self.mask = (1 << num_slots) - 1

    def __setitem__(self, slot, value) -> None:
        super().__setitem__(slot, bool(value))
        bit = 1 << slot
        self.mask = (self.mask | bit) if value else (self.mask & ~bit)


@dataclass(eq=False)
class LoRASlots:
    """The slot buffers of one group of projections that share an input (layout: module doc)."""

    a: torch.Tensor  # [num_slots, max_rank * P, in]
    b: list[torch.Tensor]  # P x [num_slots, max_rank, out_p]
    _views: dict = field(default_factory=dict, repr=False)

    @property
    def num_proj(self) -> int:
        return len(self.b)

    @property
    def max_rank(self) -> int:
        return self.b[0].shape[1]

    def segment_weights(self, slot: int, rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(a[slot, :rank*P], [b_p[slot, :rank]]): views, cached because the buffers never move
        (the owning module drops this object when its buffers are replaced)."""
        key = (slot, rank)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = (self.a[slot, :rank * self.num_proj], [b[slot, :rank] for b in self.b])
        return views

    def peft_a(self, p: int) -> torch.Tensor:
        """Projection p's A as [num_slots, max_rank, in] (PEFT's orientation): a view to write into."""
        s, c, k = self.a.shape
        return self.a.view(s, c // self.num_proj, self.num_proj, k)[:, :, p]

    def peft_b(self, p: int) -> torch.Tensor:
        """Projection p's B as [num_slots, out, max_rank] (PEFT's orientation): a view to write into."""
        return self.b[p].transpose(1, 2)

    @classmethod
    def from_peft(cls, a: list[torch.Tensor], b: list[torch.Tensor]) -> "LoRASlots":
        """Build the layout from PEFT-oriented stacks a_p[num_slots, R, in], b_p[num_slots, out_p, R]
        (tests and tools; the engine writes slots through `peft_a`/`peft_b`)."""
        s, r, k = a[0].shape
        slots = cls(torch.empty(s, r * len(a), k, dtype=a[0].dtype, device=a[0].device),
                    [torch.empty(s, r, bp.shape[1], dtype=bp.dtype, device=bp.device) for bp in b])
        for p, (ap, bp) in enumerate(zip(a, b)):
            slots.peft_a(p).copy_(ap)
            slots.peft_b(p).copy_(bp)
        return slots
