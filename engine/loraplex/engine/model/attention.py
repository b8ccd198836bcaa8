"""Paged attention over a mixed batch: prefill chunks one sequence at a time, decodes together."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.kernels.ops import KernelOps, attention_for


@dataclass
class PrefillSpan:
    """n query tokens of one sequence at rows [start, start+n) of the batch; the last n of its
    context_len tokens (earlier chunks are already in the cache)."""

    start: int
    num_tokens: int
    context_len: int
    block_table: torch.Tensor  # int32 [num_blocks]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]: cache slot of every new token
    prefills: list[PrefillSpan]
    decode_rows: torch.Tensor | None  # int64 [B]: batch row of each decode token
    decode_block_tables: torch.Tensor | None  # int32 [B, max_blocks]
    decode_context_lens: torch.Tensor | None  # int32 [B]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                    meta: AttentionMetadata, ops: KernelOps, scale: float, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D] for the batch's new tokens. Returns [T, H, D].

    `sliding_window` W: each token attends to the W tokens ending at itself (the cache keeps
    them all; only the mask narrows). `softcap`: Gemma 2's tanh cap on the scores."""
    k_cache, v_cache = kv_cache
    ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    prefill, decode = attention_for(ops, sliding_window, softcap)
    extra = {} if sliding_window is None and softcap is None else {"sliding_window": sliding_window, "softcap": softcap}
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_tokens)
        out[rows] = prefill(q[rows], k_cache, v_cache, span.block_table, span.context_len, scale, **extra)
    if meta.decode_rows is not None:
        out[meta.decode_rows] = decode(
            q[meta.decode_rows], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale, **extra)
    return out
