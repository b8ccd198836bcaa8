"""Triton paged decode attention against paged_decode_attention_ref.

The oracle is the reference on the fp32-upcast inputs (it computes in fp32). Tolerances, on
|got - oracle| <= atol + rtol * |oracle| (outputs are averages of N(0, 1) values, |out| < ~3):
  fp32: 2e-5   fp16: 2e-3   bf16: 1.6e-2
(16-bit: the output's rounding, plus, on a GPU, P rounded to the input dtype for the PV MMA.)
Cache rows that no sequence may read (other blocks, rows past a context's end in its last
block) hold NaN in the kernel's copy of the cache: reading any of them would show.
"""
from __future__ import annotations

import random

import pytest
import torch

from loraplex.kernels.attention_ref import paged_decode_attention_ref, write_kv_ref
from loraplex.kernels.triton_attention import paged_decode_attention_triton

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_cache(context_lens, num_heads, num_kv_heads, head_dim, dtype, device, block_size=16,
               spare_blocks=3, seed=0, q_scale=1.0, bt_dtype=torch.int32):
    """A shuffled paged cache holding every sequence; returns (q, clean caches, poisoned caches,
    block_tables, context_lens)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [(n + block_size - 1) // block_size for n in context_lens]
    total = sum(nblocks) + spare_blocks
    k = torch.randn(total, block_size, num_kv_heads, head_dim, generator=g)
    v = torch.randn(total, block_size, num_kv_heads, head_dim, generator=g)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=g) * q_scale
    perm = torch.randperm(total, generator=g)
    tables = torch.zeros(len(context_lens), max(nblocks + [1]), dtype=torch.int64)  # padding: block 0
    readable = torch.zeros(total, block_size, dtype=torch.bool)
    i = 0
    for b, (n, nb) in enumerate(zip(context_lens, nblocks)):
        tables[b, :nb] = perm[i:i + nb]
        i += nb
        for t in range(n):
            readable[tables[b, t // block_size], t % block_size] = True
    k, v, q = k.to(dtype), v.to(dtype), q.to(dtype)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[~readable] = float("nan")
    v_bad[~readable] = float("nan")
    lens = torch.tensor(context_lens, dtype=torch.int32)
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), (to(k), to(v)), (to(k_bad), to(v_bad)), to(tables.to(bt_dtype)), to(lens)


def check(q, clean, poisoned, tables, lens, dtype, **kw):
    scale = q.shape[-1] ** -0.5
    got = paged_decode_attention_triton(q, *poisoned, tables, lens, scale, **kw)
    assert got.dtype == q.dtype and got.shape == q.shape
    want = paged_decode_attention_ref(q.float(), clean[0].float(), clean[1].float(), tables, lens, scale)
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


# Lengths around the 16-token block boundary, several blocks, and a 1-token context.
LENS = [1, 15, 16, 17, 33, 70]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(8, 2), (9, 3), (4, 4), (6, 1)], ids=lambda h: f"H{h[0]}-KV{h[1]}")
def test_decode_gqa_block_boundaries(dtype, heads, device):
    q, clean, poisoned, tables, lens = make_cache(LENS, *heads, 64, dtype, device)
    check(q, clean, poisoned, tables, lens, dtype)


@pytest.mark.parametrize("block_n", [16, 32])
def test_decode_tiles_smaller_than_context(block_n, device):
    """Many online-softmax steps, with a max that moves between tiles (large scores)."""
    q, clean, poisoned, tables, lens = make_cache(LENS, 8, 2, 32, torch.float32, device, q_scale=6.0)
    check(q, clean, poisoned, tables, lens, torch.float32, block_n=block_n)


def test_decode_head_dim_not_power_of_two_int64_tables(device):
    q, clean, poisoned, tables, lens = make_cache([5, 40], 4, 2, 48, torch.float16, device,
                                                  bt_dtype=torch.int64)
    check(q, clean, poisoned, tables, lens, torch.float16)


def test_decode_block_size_8_and_strided_q(device):
    q, clean, poisoned, tables, lens = make_cache([3, 8, 9, 25], 6, 2, 32, torch.float32, device, block_size=8)
    wide = torch.zeros(q.shape[0], q.shape[1] * 3, q.shape[2], device=device)
    wide[:, ::3] = q  # a non-contiguous head stride
    check(wide[:, ::3], clean, poisoned, tables, lens, torch.float32)


def test_decode_after_write_kv(device):
    """The engine's order: write the new token's K/V through write_kv_ref, then attend."""
    q, (k, v), _, tables, lens = make_cache([17, 21], 4, 2, 32, torch.float16, device)
    new_k = torch.randn(2, 2, 32).to(torch.float16).to(device)
    new_v = torch.randn(2, 2, 32).to(torch.float16).to(device)
    pos = lens.long() - 1  # the new tokens' positions: 16 (first row of a block) and 20
    slot = tables[torch.arange(2, device=device), pos // 16].long() * 16 + pos % 16
    write_kv_ref(new_k, new_v, k, v, slot)
    assert torch.equal(k.view(-1, 2, 32)[slot], new_k)
    check(q, (k, v), (k, v), tables, lens, torch.float16)


def test_decode_empty_batch(device):
    q = torch.zeros(0, 4, 32, device=device)
    k = torch.zeros(2, 16, 2, 32, device=device)
    out = paged_decode_attention_triton(q, k, k, torch.zeros(0, 1, dtype=torch.int32, device=device),
                                        torch.zeros(0, dtype=torch.int32, device=device), 0.1)
    assert out.shape == (0, 4, 32)


@pytest.mark.parametrize("seed", range(6))
def test_decode_random(seed, device):
    rng = random.Random(seed)
    kv = rng.choice([1, 2, 3])
    heads = (kv * rng.choice([1, 2, 3, 4]), kv)
    lens = [rng.randint(1, 60) for _ in range(rng.randint(1, 5))]
    dtype = rng.choice(DTYPES)
    q, clean, poisoned, tables, lens_t = make_cache(lens, *heads, rng.choice([16, 32, 64]), dtype, device,
                                                    block_size=rng.choice([8, 16]), seed=seed)
    check(q, clean, poisoned, tables, lens_t, dtype, block_n=rng.choice([None, 16, 64]))
