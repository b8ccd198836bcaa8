"""Turns a scheduled batch into one forward pass over flattened tokens, then samples.

Rows are ordered by LoRA slot so that each adapter's tokens form one contiguous segment (the
layout the multi-LoRA kernels expect); rows without an adapter come first and form no segment.

Per step, the inputs (token ids, positions, cache slots, block tables, context lengths, LoRA
segments) are written into persistent host buffers (pinned on CUDA) and copied into
preallocated device buffers (`StepBuffers`); the LoRA segment metadata is built once per step
and read by every layer. On CUDA with the Triton kernels, a decode-only step replays a CUDA
graph captured for the next batch size up (`cuda_graphs.py`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from loraplex.engine.core.sampler import sample
from loraplex.engine.core.scheduler import ScheduledSeq
from loraplex.kernels.lora_batch import LoRABatch
from loraplex.kernels.ops import KernelOps, get_kernel_ops
from loraplex.engine.model.attention import AttentionMetadata, PrefillSpan
from loraplex.engine.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

_NP = {torch.int64: np.int64, torch.int32: np.int32}


class StepBuffers:
    """Persistent step inputs: per field a host buffer (pinned on CUDA) and a device buffer,
    allocated once and doubled when a step needs more. On the CPU the device buffer is the host
    buffer, so nothing is copied.

    On CUDA the host-to-device copies are asynchronous: `begin()` waits for the previous step's
    copies before the host buffers are written again."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._bufs: dict[str, tuple[np.ndarray, torch.Tensor, torch.Tensor]] = {}
        self._copied = torch.cuda.Event() if self.cuda else None
        self._pending = False

    def begin(self) -> None:
        if self._pending:
            self._copied.synchronize()
            self._pending = False

    def end(self) -> None:
        if self.cuda:
            self._copied.record()
            self._pending = True

    def _get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype):
        entry = self._bufs.get(name)
        if entry is None or any(n > c for n, c in zip(shape, entry[1].shape)):
            old = entry[1].shape if entry is not None else (0,) * len(shape)
            cap = tuple(max(n, 2 * c, 16) for n, c in zip(shape, old))
            host = torch.zeros(cap, dtype=dtype, pin_memory=self.cuda)
            dev = torch.zeros(cap, dtype=dtype, device=self.device) if self.cuda else host
            entry = self._bufs[name] = (host.numpy(), host, dev)
        return entry

    def _to_device(self, host: torch.Tensor, dev: torch.Tensor, n: int) -> torch.Tensor:
        if dev is host:
            return host[:n]
        return dev[:n].copy_(host[:n], non_blocking=True)

    def stage(self, name: str, values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """A 1-D list -> its device tensor (a view of the persistent buffer)."""
        n = len(values)
        arr, host, dev = self._get(name, (n,), dtype)
        arr[:n] = values
        return self._to_device(host, dev, n)

    def stage_rows(self, name: str, rows: list[list[int]], width: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Ragged rows -> a [len(rows), width] device view. Entries past a row's length keep
        stale values (earlier block ids, or zeros): the kernels never read past a context."""
        arr, host, dev = self._get(name, (len(rows), width), dtype)
        for i, row in enumerate(rows):
            arr[i, :len(row)] = row
        return self._to_device(host, dev, len(rows))[:, :width]


@dataclass
class StepInputs:
    ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    lora: LoRABatch | None
    last_rows: list[int]  # the row of each item's last token
    decode_only: bool


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0, max_num_seqs: int = 256, cuda_graphs: bool = True):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.ops: KernelOps = get_kernel_ops(device)
        self.buffers = StepBuffers(device)
        # Unseeded rows draw on the device, from one generator seeded from the engine's seed.
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.graphs = None
        # LORAPLEX_CUDA_GRAPHS: "1" (default) graphs on CUDA with the Triton kernels, "0" off,
        # "eager" the same static-buffer decode path without capture on any device (tests).
        mode = os.environ.get("LORAPLEX_CUDA_GRAPHS", "1")
        use_graphs = cuda_graphs and self.ops.name == "triton" and ((device.type == "cuda" and mode != "0") or mode == "eager")
        # CUDA graphs pad a decode batch up to a captured size; the padded rows write their K/V
        # into one extra block that the block manager never hands out.
        cfg = model.config
        shape = (num_blocks + (1 if use_graphs else 0), block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(cfg.num_layers)]
        if use_graphs:
            from loraplex.engine.core.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_num_seqs, scratch_slot=num_blocks * block_size,
                                       capture=device.type == "cuda" and mode != "eager")

    @staticmethod
    def kv_bytes_per_block(model_cfg, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * model_cfg.num_layers * block_size * model_cfg.num_kv_heads * model_cfg.head_dim * elem

    def prepare(self, batch: list[ScheduledSeq]) -> StepInputs:
        """Flatten the batch's new tokens into the persistent buffers, one copy per field."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_lens: list[int] = []
        tables: list[list[int]] = []  # decode items' block tables first, then prefills'
        prefill_items: list[tuple[int, int, int, list[int]]] = []  # (start, n, context, table)
        segments: list[tuple[int, int, int, int]] = []
        last_rows: list[int] = []
        bs = self.block_size
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start, ctx = len(input_ids), seq.num_computed_tokens + n
            input_ids.extend(seq.token_slice(seq.num_computed_tokens, ctx))
            table = seq.block_table
            if n == 1:  # a decode: most of a busy step, so no range objects
                p = ctx - 1
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                decode_rows.append(start)
                decode_lens.append(ctx)
                tables.append(table)
            else:
                pos = range(seq.num_computed_tokens, ctx)
                positions.extend(pos)
                slots.extend(table[p // bs] * bs + p % bs for p in pos)
                prefill_items.append((start, n, ctx, table))
            if seq.lora_slot >= 0:
                if segments and segments[-1][2] == seq.lora_slot and segments[-1][1] == start:
                    s0, _, slot, rank = segments[-1]
                    segments[-1] = (s0, start + n, slot, rank)
                else:
                    segments.append((start, start + n, seq.lora_slot, seq.lora_rank))
            last_rows.append(start + n - 1)

        buf = self.buffers
        buf.begin()
        tables += [t for _, _, _, t in prefill_items]
        width = max((len(t) for t in tables), default=0)
        bt = buf.stage_rows("block_tables", tables, width)
        num_decode = len(decode_rows)
        prefills = [PrefillSpan(start, n, ctx, bt[num_decode + i, :len(t)])
                    for i, (start, n, ctx, t) in enumerate(prefill_items)]
        attn = AttentionMetadata(
            slot_mapping=buf.stage("slot_mapping", slots),
            prefills=prefills,
            decode_rows=buf.stage("decode_rows", decode_rows) if decode_rows else None,
            decode_block_tables=bt[:num_decode] if decode_rows else None,
            decode_context_lens=buf.stage("context_lens", decode_lens, torch.int32) if decode_rows else None,
        )
        lora = None
        if segments:
            meta = buf.stage("lora_segments", [v for i in range(4) for v in (seg[i] for seg in segments)])
            lora = LoRABatch.build(segments, self.device, meta=meta.view(4, len(segments)))
        ids = buf.stage("input_ids", input_ids)
        pos_t = buf.stage("positions", positions)
        buf.end()
        return StepInputs(ids, pos_t, attn, lora, last_rows, decode_only=not prefill_items)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> list[tuple[ScheduledSeq, int | None]]:
        """One forward + sampling: (item, sampled token or None if it only prefilled) per item."""
        batch = sorted(batch, key=lambda item: item.seq.lora_slot) if len(batch) > 1 else batch
        step = self.prepare(batch)
        hidden = self.graphs.run(step) if self.graphs is not None and step.decode_only else None
        if hidden is None:
            hidden = self.model(step.ids, step.positions, step.attn, step.lora, self.ops, self.kv_caches)
        self._record_prompt_logprobs(batch, hidden)
        sampling = [(i, item) for i, item in enumerate(batch) if item.samples]
        tokens: dict[int, int] = {}
        if sampling:
            rows = [step.last_rows[i] for i, _ in sampling]
            # Every row samples in a decode-only step: no gather needed.
            last = hidden[:len(rows)] if rows == list(range(len(rows))) else hidden[rows]
            logits = self.model.compute_logits(last)
            sampled = sample(logits, [item.seq for _, item in sampling], self.generator)
            tokens = {id(item): t for (_, item), t in zip(sampling, sampled)}
        return [(item, tokens.get(id(item))) for item in batch]

    def _record_prompt_logprobs(self, batch: list[ScheduledSeq], hidden: torch.Tensor) -> None:
        """For requests that asked, the logprob of each prompt token given the ones before it."""
        for chunk in prompt_logprob_chunks(batch):
            record_chunk(chunk, self.model.compute_logits(hidden[chunk_rows(chunk)]))


# Prompt logprobs need full-vocabulary fp32 logits for every prompt row of a step, up to
# max_num_batched_tokens rows, outside the KV budget (2,048 rows x 128k vocab x 4 bytes = 1 GiB
# per copy). They are computed this many rows at a time: the extra peak is then about
# 3 x PROMPT_LOGPROB_CHUNK_ROWS x vocab x 4 bytes (the head's output, its fp32 copy, the
# log-softmax), ~200 MB at a 128k vocabulary, below the sampling logits the KV sizing reserves.
PROMPT_LOGPROB_CHUNK_ROWS = 128


def prompt_logprob_chunks(batch: list[ScheduledSeq], max_rows: int | None = None) -> list[list[tuple]]:
    """The spans of prompt_logprob_spans cut and packed into chunks of at most `max_rows` rows
    (PROMPT_LOGPROB_CHUNK_ROWS): one logits computation each. Every rank of a tensor-parallel
    engine computes the same chunks (tp_worker.StepPlan.logit_chunks)."""
    max_rows = max_rows or PROMPT_LOGPROB_CHUNK_ROWS
    chunks: list[list[tuple]] = []
    size = max_rows  # rows in the last chunk: a full one starts the next
    for seq, lo, hi, row in prompt_logprob_spans(batch):
        while hi > lo:
            if size == max_rows:
                chunks.append([])
                size = 0
            n = min(hi - lo, max_rows - size)
            chunks[-1].append((seq, lo, lo + n, row))
            lo, row, size = lo + n, row + n, size + n
    return chunks


def chunk_rows(chunk: list[tuple]) -> list[int]:
    """The batch rows whose logits a chunk needs, in order."""
    return [r for _, lo, hi, row in chunk for r in range(row, row + hi - lo)]


def record_chunk(chunk: list[tuple], logits: torch.Tensor) -> None:
    """Record the prompt logprobs of a chunk from its logits ([rows of the chunk, vocab])."""
    k = 0
    for seq, lo, hi, _ in chunk:
        record_prompt_logprobs(seq, lo, hi, logits[k:k + hi - lo])
        k += hi - lo


def prompt_logprob_spans(batch: list[ScheduledSeq]) -> list[tuple]:
    """(seq, lo, hi, row): the batch rows [row, row + hi - lo) whose logits give the logprobs of
    prompt tokens lo + 1 .. hi of seq, for each request that asked for prompt logprobs."""
    spans, start = [], 0
    for item in batch:
        seq, n = item.seq, item.num_tokens
        lps = seq.prompt_logprobs
        if lps is not None and len(lps) < seq.num_prompt_tokens:
            # The row at position p predicts token p+1. Skip positions already recorded
            # (a recompute after preemption) and those past the prompt.
            first = seq.num_computed_tokens
            lo, hi = max(first, len(lps) - 1), min(first + n, seq.num_prompt_tokens - 1)
            if hi > lo:
                spans.append((seq, lo, hi, start + lo - first))
        start += n
    return spans


def record_prompt_logprobs(seq, lo: int, hi: int, logits: torch.Tensor) -> None:
    targets = torch.tensor(seq.prompt_ids[lo + 1:hi + 1], device=logits.device)
    seq.prompt_logprobs.extend(logits.log_softmax(-1).gather(1, targets[:, None])[:, 0].tolist())


def profile_kv_blocks(model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, block_size: int,
                      memory_fraction: float, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """CUDA: how many KV blocks fit, measured (nano-vllm's warmup_model / allocate_kv_cache).

    One forward at the largest step (max_num_batched_tokens tokens in one prefill, LoRA on every
    token at the largest rank, logits and the sampler's sort for max_num_seqs rows) measures the
    activation peak. The cache then gets what is left of `memory_fraction` of the GPU's total
    memory after what is in use (weights, other processes) and that peak."""
    cfg = model.config
    ops = get_kernel_ops(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    t = max_num_batched_tokens
    nblocks = -(-t // block_size)
    shape = (nblocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
              for _ in range(cfg.num_layers)]
    positions = torch.arange(t, device=device) % model.rope_cos.shape[0]
    attn = AttentionMetadata(
        slot_mapping=torch.arange(t, device=device),
        prefills=[PrefillSpan(0, t, t, torch.arange(nblocks, dtype=torch.int32, device=device))],
        decode_rows=None, decode_block_tables=None, decode_context_lens=None)
    groups = model.lora_groups()
    rank = groups[0].slots.max_rank if groups and groups[0].lora_a.shape[0] else 0
    lora = LoRABatch.build([(0, t, 0, rank)], device) if rank else None
    with torch.inference_mode():
        hidden = model(torch.zeros(t, dtype=torch.long, device=device), positions, attn, lora, ops, caches)
        logits = model.compute_logits(hidden[:max_num_seqs])
        logits.sort(dim=-1)
    torch.cuda.synchronize(device)
    del caches, hidden, logits
    torch.cuda.empty_cache()  # else mem_get_info counts the freed activations as in use
    stats = torch.cuda.memory_stats(device)
    peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    per_block = ModelRunner.kv_bytes_per_block(cfg, block_size, dtype)
    budget = int(total * memory_fraction) - used - (peak - current)
    log.info("KV cache budget: %.2f GiB (total %.1f GiB x %.2f, in use %.2f GiB, activation peak %.2f GiB)",
             budget / 2**30, total / 2**30, memory_fraction, used / 2**30, (peak - current) / 2**30)
    return max(1, budget // per_block)
