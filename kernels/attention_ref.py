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


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """One query token per sequence. q: [B, H, D]; returns [B, H, D].

    Sequence b attends to its first context_lens[b] cached tokens (the new token included).
    """
    k = gather_kv_ref(k_cache, block_tables)  # [B, L, kvh, d]
    v = gather_kv_ref(v_cache, block_tables)
    L = k.shape[1]
    valid = torch.arange(L, device=q.device)[None, :] < context_lens[:, None].to(q.device)  # [B, L]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2).float(),  # [B, H, 1, D]
        k.transpose(1, 2).float(),  # [B, kvh, L, D]
        v.transpose(1, 2).float(),
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2).to(q.dtype)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_table: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    """A chunk of n query tokens of one sequence, the last n of its context_len tokens.

    q: [n, H, D]; returns [n, H, D]. Query j sits at position context_len - n + j and attends
    causally to every cached token up to and including itself (earlier chunks included).
    """
    n = q.shape[0]
    k = gather_kv_ref(k_cache, block_table[None])[0, :context_len]  # [L, kvh, d]
    v = gather_kv_ref(v_cache, block_table[None])[0, :context_len]
    q_pos = torch.arange(context_len - n, context_len, device=q.device)
    mask = torch.arange(context_len, device=q.device)[None, :] <= q_pos[:, None]  # [n, L]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        attn_mask=mask[None], scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1).to(q.dtype)


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
