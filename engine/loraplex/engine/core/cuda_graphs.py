"""Decode steps under CUDA graphs (CUDA + Triton kernels only).

A decode step launches hundreds of small kernels (per layer: norms, four GEMMs, rope, the KV
write, attention, the LoRA shrink/expands); at small batches their launch cost exceeds their
work. `DecodeGraphs` captures the model's forward once per batch size in `capture_sizes` (with
and without LoRA) and replays the smallest graph that fits a decode-only step.

What makes a forward capturable here:
- every input lives in a static buffer of the largest size; a replay copies the step's inputs
  into its first n rows and pads the rest: token 0 at position 0, its K/V written to a scratch
  slot (one extra cache block the block manager never hands out), context length 0 (the
  Triton decode kernel reads nothing and returns zeros) and empty LoRA segments;
- the Triton kernels read segment bounds, ranks, context lengths and block tables from device
  memory, so one graph serves any mix of adapters: its grid is sized for the worst case (one
  segment per row, or one segment of every row, at the slot buffers' max rank) and programs
  past a segment's end or rank exit at once;
- the LoRA batch of a capture has `slot_mask = -1`, so every group runs its shrink and every
  expand (the per-batch "no adapter targets this projection" skip is a Python decision that a
  graph would freeze).
Sampling runs outside the graph, on the replay's output rows.

With `capture=False` (LORAPLEX_CUDA_GRAPHS=eager) the same static-buffer forward runs eagerly
at replay time, on any device: the CPU tests prove the padding, the scratch slot and the
worst-case grids with the Triton interpreter that way (tests/kernels/test_decode_graphs.py).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from loraplex.kernels.lora_batch import LoRABatch
from loraplex.engine.model.attention import AttentionMetadata

if TYPE_CHECKING:
    from loraplex.engine.core.model_runner import ModelRunner, StepInputs

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", max_num_seqs: int, scratch_slot: int, capture: bool = True):
        self.runner = runner
        self.capture = capture
        self.replays = 0
        model, dev = runner.model, runner.device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_size = self.sizes[-1]
        self.scratch_slot = scratch_slot
        g = self.max_size
        max_blocks = -(-model.rope_cos.shape[0] // runner.block_size)
        self.ids = torch.zeros(g, dtype=torch.long, device=dev)
        self.positions = torch.zeros(g, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((g,), scratch_slot, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(g, max_blocks, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(g, dtype=torch.int32, device=dev)
        self.rows = torch.arange(g, dtype=torch.long, device=dev)
        self.lora_meta = torch.zeros(4, g, dtype=torch.long, device=dev)
        groups = model.lora_groups()
        self.max_rank = groups[0].slots.max_rank if groups and groups[0].lora_a.shape[0] else 0
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        if capture:
            self._capture()

    def _meta(self, n: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:n], prefills=[], decode_rows=self.rows[:n],
                                 decode_block_tables=self.block_tables[:n], decode_context_lens=self.context_lens[:n])

    def _lora(self, n: int) -> LoRABatch:
        # Worst-case grid: n segments, each up to n tokens, at the buffers' max rank. The Python
        # segment list only sizes the grid; the kernels read the real bounds from lora_meta.
        m = self.lora_meta[:, :n]
        return LoRABatch([(0, n, 0, self.max_rank)] * n, m[0], m[1], m[2], m[3],
                         max_rank=self.max_rank, max_seg_len=n, slot_mask=-1)

    def _forward(self, n: int, with_lora: bool) -> torch.Tensor:
        r = self.runner
        return r.model(self.ids[:n], self.positions[:n], self._meta(n), self._lora(n) if with_lora else None,
                       r.ops, r.kv_caches)

    @torch.inference_mode()
    def _capture(self) -> None:
        variants = [False, True] if self.max_rank else [False]
        for n in reversed(self.sizes):  # largest first: later graphs reuse its memory pool
            for with_lora in variants:
                self._forward(n, with_lora)  # warm-up: compiles the Triton kernels outside capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self._forward(n, with_lora)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[(n, with_lora)] = (graph, out)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def run(self, step: "StepInputs") -> torch.Tensor | None:
        """Replay the graph for this decode-only step; None when none fits (run it eagerly)."""
        n = step.ids.shape[0]
        if n > self.max_size or (step.lora is not None and not self.max_rank):
            return None
        size = next(s for s in self.sizes if s >= n)
        a = step.attn
        self.ids[:n].copy_(step.ids)
        self.positions[:n].copy_(step.positions)
        self.slot_mapping[:n].copy_(a.slot_mapping)
        self.slot_mapping[n:size].fill_(self.scratch_slot)
        width = a.decode_block_tables.shape[1]
        self.block_tables[:n, :width].copy_(a.decode_block_tables)
        self.context_lens[:n].copy_(a.decode_context_lens)
        self.context_lens[n:size].zero_()
        if step.lora is not None:
            s = len(step.lora.segments)
            self.lora_meta[:, :s].copy_(torch.stack([step.lora.seg_start, step.lora.seg_end,
                                                      step.lora.seg_slot, step.lora.seg_rank]))
            self.lora_meta[:, s:size].zero_()  # empty segments: start = end = 0
        self.replays += 1
        if not self.capture:
            return self._forward(size, step.lora is not None)[:n]
        graph, out = self.graphs[(size, step.lora is not None)]
        graph.replay()
        return out[:n]
