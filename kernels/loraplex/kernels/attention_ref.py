"""Torch reference for paged attention.

KV cache layout, per layer: `k_cache`/`v_cache` of shape [num_blocks, block_size, num_kv_heads,
head_dim]. A sequence's token i lives in block `block_table[i // block_size]`, row
`i % block_size`; `slot_mapping[t] = block * block_size + row` addresses one new token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values ([T, kv_heads, head_dim]) at their cache slots."""
    kvh, d = k.shape[-2:]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv_ref(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks] block ids -> [B, max_blocks * block_size, kv_heads, head_dim]."""
    b, nb = block_tables.shape
    g = cache[block_tables.long()]  # [B, nb, bs, kvh, d]
    return g.reshape(b, nb * cache.shape[1], *cache.shape[2:])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: float | None = None) -> torch.Tensor:
    """Masked attention in fp32. q: [B, H, Lq, D], k/v: [B, KVH, Lk, D] (GQA), mask: bool,
    broadcastable to [B, H, Lq, Lk]. With `softcap` (Gemma 2) the scores become
    cap * tanh(scores / cap) before the mask; SDPA has no hook for that, so it is spelled out."""
    q, k, v = q.float(), k.float(), v.float()
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * (scale / softcap)) * softcap
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float, sliding_window: int | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """One query token per sequence. q: [B, H, D]; returns [B, H, D].

    Sequence b attends to its first context_lens[b] cached tokens (the new token included), or
    with `sliding_window` W only to the last W of them.
    """
    k = gather_kv_ref(k_cache, block_tables)  # [B, L, kvh, d]
    v = gather_kv_ref(v_cache, block_tables)
    L = k.shape[1]
    pos = torch.arange(L, device=q.device)[None, :]
    lens = context_lens[:, None].to(q.device).long()
    valid = pos < lens  # [B, L]
    if sliding_window is not None:
        valid &= pos >= lens - sliding_window
    out = attend(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), valid[:, None, None, :], scale, softcap)
    return out.squeeze(2).to(q.dtype)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_table: torch.Tensor, context_len: int, scale: float,
                                sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """A chunk of n query tokens of one sequence, the last n of its context_len tokens.

    q: [n, H, D]; returns [n, H, D]. Query j sits at position context_len - n + j and attends
    causally to every cached token up to and including itself (earlier chunks included), or
    with `sliding_window` W to the W tokens ending at itself.
    """
    n = q.shape[0]
    k = gather_kv_ref(k_cache, block_table[None])[0, :context_len]  # [L, kvh, d]
    v = gather_kv_ref(v_cache, block_table[None])[0, :context_len]
    q_pos = torch.arange(context_len - n, context_len, device=q.device)[:, None]
    k_pos = torch.arange(context_len, device=q.device)[None, :]
    mask = k_pos <= q_pos  # [n, L]
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    out = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask[None, None], scale, softcap)
    return out[0].transpose(0, 1).to(q.dtype)


def paged_prefill_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_table: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    """The CUDA prefill path: `paged_prefill_attention_ref`'s semantics, in the cache's own dtype.

    The reference upcasts to fp32 and always passes a mask, which rules out the fused SDPA
    backends. Here the gathered K/V stay 16-bit and a chunk with no earlier context (the common
    first chunk) is plain causal attention (`is_causal=True`: flash attention on a GPU); a later
    chunk passes its [n, L] causal-with-offset mask (the memory-efficient backend).
    """
    n = q.shape[0]
    k = gather_kv_ref(k_cache, block_table[None])[0, :context_len].to(q.dtype)  # [L, kvh, d]
    v = gather_kv_ref(v_cache, block_table[None])[0, :context_len].to(q.dtype)
    if n == context_len:
        mask, causal = None, True
    else:
        q_pos = torch.arange(context_len - n, context_len, device=q.device)
        mask, causal = (torch.arange(context_len, device=q.device)[None, :] <= q_pos[:, None])[None], False
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
