"""Triton paged-attention decode kernel (one query token per sequence), GQA-aware.

Same cache layout and semantics as `attention_ref.paged_decode_attention_ref`:
`k_cache`/`v_cache` are [num_blocks, block_size, num_kv_heads, head_dim]; sequence b's token i
lives in block `block_tables[b, i // block_size]`, row `i % block_size`; it attends to its first
`context_lens[b]` tokens.

Grid: (sequence, kv head). One program serves the whole group of H / KVH query heads that share
a KV head, so every K/V row is read from memory once per group. It walks the context in tiles of
BLOCK_N tokens (independent of block_size: each token's block id is looked up in the block
table), with an online softmax (running max and sum, base-2 exponentials) and fp32 accumulation.

Writing the cache stays `attention_ref.write_kv_ref` (two `index_copy_`s); see docs/kernels.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels.triton_lora import _16BIT, interpreting

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, ctx_ptr,
    qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_oh, stride_od,
    stride_btb, stride_btn,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g

    q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [G, D]
    if not NATIVE_DOT:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    bt_row = bt_ptr + b * stride_btb

    for n0 in range(0, ctx, BLOCK_N):
        tok = n0 + offs_n
        n_mask = tok < ctx
        blk = tl.load(bt_row + (tok // BLOCK_SIZE) * stride_btn, mask=n_mask, other=0).to(tl.int64)
        row = tok % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_off = blk * stride_kb + row * stride_kt + kvh * stride_kh  # [N]
        kt = tl.load(k_ptr + k_off[None, :] + offs_d[:, None] * stride_kd,
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # [D, N]
        v_off = blk * stride_vb + row * stride_vt + kvh * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)  # [N, D]
        if NATIVE_DOT:
            s = tl.dot(q, kt)
        else:
            s = tl.dot(q, kt.to(tl.float32), input_precision=PRECISION)
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # [G, N], log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if NATIVE_DOT:
            pv = tl.dot(p.to(v.dtype), v)
        else:
            pv = tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # an empty context gives zeros, not NaN
    out = acc / l_i[:, None]
    o_ptrs = o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  scale: float, *, block_n: int | None = None) -> torch.Tensor:
    """One query token per sequence. q: [B, H, D]; returns [B, H, D] in q's dtype."""
    B, H, D = q.shape
    _, block_size, kvh, d_cache = k_cache.shape
    assert d_cache == D and v_cache.shape == k_cache.shape and H % kvh == 0
    assert block_tables.shape[0] == B and context_lens.shape[0] == B
    out = torch.empty_like(q)
    if B == 0:
        return out
    group = H // kvh
    if interpreting():
        native, prec = False, "ieee"
    else:
        native = q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in _16BIT
        prec = "tf32" if q.dtype in _16BIT else "ieee"
    bn = block_n or (128 if interpreting() else 64)
    _paged_decode_kernel[(B, kvh)](
        q, k_cache, v_cache, out, block_tables, context_lens,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        block_tables.stride(0), block_tables.stride(1),
        GROUP=group, HEAD_DIM=D, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_N=bn, NATIVE_DOT=native, PRECISION=prec,
    )
    return out
