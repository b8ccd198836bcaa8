"""Turns a scheduled batch into one forward pass over flattened tokens, then samples.

Rows are ordered by LoRA slot so that each adapter's tokens form one contiguous segment (the
layout the multi-LoRA kernels expect); rows without an adapter come first and form no segment.
"""
from __future__ import annotations

import torch

from loraplex.engine.core.sampler import sample
from loraplex.engine.core.scheduler import ScheduledSeq
from loraplex.kernels.lora_ref import LoRABatch
from loraplex.kernels.ops import KernelOps, get_kernel_ops
from loraplex.engine.model.attention import AttentionMetadata, PrefillSpan
from loraplex.engine.model.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.ops: KernelOps = get_kernel_ops(device)
        cfg = model.config
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(cfg.num_layers)]
        self.generator = torch.Generator().manual_seed(seed)  # for requests without a seed

    @staticmethod
    def kv_bytes_per_block(model_cfg, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * model_cfg.num_layers * block_size * model_cfg.num_kv_heads * model_cfg.head_dim * elem

    def _prepare(self, batch: list[ScheduledSeq]):
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillSpan] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        segments: list[tuple[int, int, int, int]] = []
        last_rows: list[int] = []
        bs = self.block_size
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start, ctx = len(input_ids), seq.num_computed_tokens + n
            input_ids.extend(seq.token_slice(seq.num_computed_tokens, ctx))
            pos = range(seq.num_computed_tokens, ctx)
            positions.extend(pos)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in pos)
            if n == 1:
                decode_rows.append(start)
                decode_tables.append(seq.block_table)
                decode_lens.append(ctx)
            else:
                prefills.append(PrefillSpan(start, n, ctx, torch.tensor(seq.block_table, dtype=torch.int32, device=self.device)))
            if seq.lora_slot >= 0:
                if segments and segments[-1][2] == seq.lora_slot and segments[-1][1] == start:
                    s0, _, slot, rank = segments[-1]
                    segments[-1] = (s0, start + n, slot, rank)
                else:
                    segments.append((start, start + n, seq.lora_slot, seq.lora_rank))
            last_rows.append(start + n - 1)
        dev = self.device
        decode = None
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            decode = (
                torch.tensor(decode_rows, dtype=torch.long, device=dev),
                torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], dtype=torch.int32, device=dev),
                torch.tensor(decode_lens, dtype=torch.int32, device=dev),
            )
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            prefills=prefills,
            decode_rows=decode[0] if decode else None,
            decode_block_tables=decode[1] if decode else None,
            decode_context_lens=decode[2] if decode else None,
        )
        lora = LoRABatch.build(segments, dev) if segments else None
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos_t, attn, lora, last_rows

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> list[tuple[ScheduledSeq, int | None]]:
        """One forward + sampling: (item, sampled token or None if it only prefilled) per item."""
        batch = sorted(batch, key=lambda item: item.seq.lora_slot) if len(batch) > 1 else batch
        ids, positions, attn, lora, last_rows = self._prepare(batch)
        hidden = self.model(ids, positions, attn, lora, self.ops, self.kv_caches)
        self._record_prompt_logprobs(batch, hidden, ids)
        sampling = [(i, item) for i, item in enumerate(batch) if item.samples]
        tokens: dict[int, int] = {}
        if sampling:
            logits = self.model.compute_logits(hidden[[last_rows[i] for i, _ in sampling]])
            sampled = sample(logits, [item.seq for _, item in sampling], self.generator)
            tokens = {id(item): t for (_, item), t in zip(sampling, sampled)}
        return [(item, tokens.get(id(item))) for item in batch]

    def _record_prompt_logprobs(self, batch: list[ScheduledSeq], hidden: torch.Tensor, ids: torch.Tensor) -> None:
        """For requests that asked, the logprob of each prompt token given the ones before it."""
        start = 0
        for item in batch:
            seq, n = item.seq, item.num_tokens
            lps = seq.prompt_logprobs
            if lps is not None and len(lps) < seq.num_prompt_tokens:
                # The row at position p predicts token p+1. Skip positions already recorded
                # (a recompute after preemption) and those past the prompt.
                first = seq.num_computed_tokens
                lo, hi = max(first, len(lps) - 1), min(first + n, seq.num_prompt_tokens - 1)
                if hi > lo:
                    logits = self.model.compute_logits(hidden[start + lo - first:start + hi - first])
                    targets = torch.tensor(seq.prompt_ids[lo + 1:hi + 1], device=logits.device)
                    lps.extend(logits.log_softmax(-1).gather(1, targets[:, None])[:, 0].tolist())
            start += n
