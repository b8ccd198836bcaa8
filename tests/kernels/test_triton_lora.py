"""Triton SGMV LoRA kernels against the torch references (lora_ref).

Without a GPU they run in Triton's interpreter (see conftest.py). The oracle is the torch
reference evaluated in float64 on the same (rounded) inputs; tolerances, on |got - oracle|
<= atol + rtol * |oracle| with values of order 1:
  fp32: 1e-4   fp16: 3e-3 (about 3 ulps)   bf16: 2.5e-2 (about 3 ulps)
The 16-bit budgets cover the single rounding of the output plus, on a GPU, TF32 in expand.
Buffer rows beyond an adapter's rank and x rows outside every segment are filled with NaN: a
kernel that read them (compute padded to max_rank, or rows of another segment) would fail.
"""
from __future__ import annotations

import random

import pytest
import torch

from loraplex.kernels.lora_batch import LoRABatch, LoRASlots
from loraplex.kernels.lora_ref import add_lora_ref, lora_expand_ref, lora_shrink_ref
from loraplex.kernels.triton_lora import add_lora_triton, lora_expand_triton, lora_shrink_triton

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# GPU-sized tiles (16-wide rank tiles, short K/N tiles): many tiles per segment, masked tails.
SMALL_TILES = dict(block_m=16, block_r=16, block_k=32, block_n=32)

# Mixed ranks 4/8/16/64 in one batch; a leading gap, gaps between segments and a trailing gap
# of adapter-less tokens; a 1-token (decode) segment; a segment longer than one 16-token tile;
# two segments on the same slot.
MIXED = [(2, 7, 1, 4), (9, 10, 3, 8), (10, 31, 0, 16), (33, 40, 2, 64), (40, 41, 1, 4), (42, 45, 4, 64)]
MIXED_T = 47


def make_problem(segments, T, d_in, d_out, dtype, device, num_slots=5, slot_rank=64, seed=0,
                 poison=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    a = torch.randn(num_slots, slot_rank, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(num_slots, d_out, slot_rank, generator=g) / 4
    y = torch.randn(T, d_out, generator=g)
    x, a, b, y = (t.to(dtype) for t in (x, a, b, y))
    if poison:
        covered = torch.zeros(T, dtype=torch.bool)
        for s, e, _, _ in segments:
            covered[s:e] = True
        x[~covered] = float("nan")
        ranks = {}
        for _, _, slot, r in segments:
            ranks[slot] = max(ranks.get(slot, 0), r)
        for slot in range(num_slots):
            a[slot, ranks.get(slot, 0):] = float("nan")
            b[slot, :, ranks.get(slot, 0):] = float("nan")
    batch = LoRABatch.build(segments, device)
    # The engine's layout: pre-transposed a[slots, in, R], b[slots, R, out] (one projection).
    slots = LoRASlots.from_peft([a.to(device)], [b.to(device)])
    return x.to(device), slots.a, slots.b[0], y.to(device), batch


def group(a, b):
    return LoRASlots(a, [b])


def oracle_add(y, x, a, b, batch):
    """add_lora_ref in float64 (NaN rows of x outside segments are never read by it)."""
    return add_lora_ref([y.double()], x.double(), group(a.double(), b.double()), batch)[0]


def check(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", [{}, SMALL_TILES], ids=["default", "small"])
def test_shrink_mixed_ranks(dtype, tiles, device):
    x, a, _, _, batch = make_problem(MIXED, MIXED_T, 96, 80, dtype, device)
    shrink_tiles = {k: v for k, v in tiles.items() if k != "block_n"}
    h = lora_shrink_triton(x, a, batch, **shrink_tiles)
    assert h.dtype == torch.float32 and h.shape == (MIXED_T, 64)
    want = lora_shrink_ref(x.double(), a.double(), batch)
    # Exact zeros outside segments and beyond each segment's rank, like the reference.
    inside = torch.zeros_like(h, dtype=torch.bool)
    for s, e, _, r in MIXED:
        inside[s:e, :r] = True
    assert not h[~inside].any()
    torch.testing.assert_close(h.double(), want.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_mixed_ranks(dtype, device):
    _, _, b, y, batch = make_problem(MIXED, MIXED_T, 96, 80, dtype, device)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(MIXED_T, 64, generator=g).to(device)
    for s, e, _, r in MIXED:
        h[s:e, r:] = float("nan")  # beyond the segment's rank: must not be read
    y0 = y.clone()
    out = lora_expand_triton(y, h, b, batch, block_m=16, block_n=32, block_r=16)
    assert out is y
    want = lora_expand_ref(y0.double(), h, b, batch)  # the reference takes h in fp32
    check(y, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", [{}, SMALL_TILES], ids=["default", "small"])
def test_add_lora_mixed_ranks_with_gaps(dtype, tiles, device):
    x, a, b, y, batch = make_problem(MIXED, MIXED_T, 96, 80, dtype, device)
    want = oracle_add(y.clone(), x, a, b, batch)
    y0 = y.clone()
    if tiles:
        h = lora_shrink_triton(x, a, batch, block_m=16, block_r=16, block_k=32)
        lora_expand_triton(y, h, b, batch, block_m=16, block_n=32, block_r=16)
    else:
        assert add_lora_triton([y], x, group(a, b), batch)[0] is y
    check(y, want, dtype)
    gaps = torch.ones(MIXED_T, dtype=torch.bool)
    for s, e, _, _ in MIXED:
        gaps[s:e] = False
    assert torch.equal(y[gaps.to(device)], y0[gaps.to(device)])  # untouched, bit for bit
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_adapter_whole_batch(dtype, device):
    segs = [(0, 37, 2, 16)]
    x, a, b, y, batch = make_problem(segs, 37, 64, 48, dtype, device)
    want = oracle_add(y.clone(), x, a, b, batch)
    add_lora_triton([y], x, group(a, b), batch)
    check(y, want, dtype)


def test_empty_batch(device):
    x, a, b, y, _ = make_problem([], 6, 32, 32, torch.float32, device, poison=False)
    batch = LoRABatch.build([], device)
    y0 = y.clone()
    assert add_lora_triton([y], x, group(a, b), batch)[0] is y
    assert torch.equal(y, y0)
    h = lora_shrink_triton(x, a, batch)
    assert h.shape == (6, 1) and not h.any()
    assert torch.equal(lora_expand_triton(y, h, b, batch), y0)


def test_zero_tokens(device):
    x, a, b, y, _ = make_problem([], 0, 32, 32, torch.float16, device, poison=False)
    batch = LoRABatch.build([], device)
    assert add_lora_triton([y], x, group(a, b), batch)[0].shape == (0, 32)


def test_strided_views(device):
    """x and y as column slices of wider buffers (e.g. a fused qkv output)."""
    segs = [(0, 3, 0, 8), (5, 12, 1, 64)]
    x, a, b, y, batch = make_problem(segs, 12, 40, 24, torch.float32, device)
    xw = torch.full((12, 100), float("nan"), device=device)
    xw[:, 30:70] = x
    yw = torch.zeros(12, 72, device=device)
    yw[:, 24:48] = y
    want = oracle_add(y.clone(), x, a, b, batch)
    add_lora_triton([yw[:, 24:48]], xw[:, 30:70], group(a, b), batch)
    check(yw[:, 24:48], want, torch.float32)
    assert not yw[:, :24].any() and not yw[:, 48:].any()


def test_matches_add_lora_ref_same_dtype(device):
    """Against the reference as the CPU engine runs it (fp16 in, fp16 intermediate rounding)."""
    x, a, b, y, batch = make_problem(MIXED, MIXED_T, 64, 64, torch.float16, device)
    a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    want = add_lora_ref([y.clone().float()], x.float(), group(a.float(), b.float()), batch)[0]
    add_lora_triton([y], x, group(a, b), batch)
    torch.testing.assert_close(y.float(), want, atol=1e-2, rtol=1e-2)


def random_segments(rng: random.Random, num_slots: int, slot_rank: int):
    segs, t = [], 0
    for _ in range(rng.randint(0, 6)):
        t += rng.choice([0, 0, 1, 3])  # gap of adapter-less tokens
        n = rng.choice([1, 1, 2, 5, 17, 33])
        segs.append((t, t + n, rng.randrange(num_slots), rng.choice([1, 2, 4, 8, 16, 24, 32, slot_rank])))
        t += n
    return segs, t + rng.choice([0, 2])


@pytest.mark.parametrize("seed", range(8))
def test_random_batches(seed, device):
    rng = random.Random(seed)
    segs, T = random_segments(rng, num_slots=4, slot_rank=64)
    d_in, d_out = rng.choice([16, 40, 64, 100]), rng.choice([8, 24, 64, 72])
    dtype = rng.choice(DTYPES)
    x, a, b, y, batch = make_problem(segs, T, d_in, d_out, dtype, device, num_slots=4, seed=seed)
    want = oracle_add(y.clone(), x, a, b, batch)
    if rng.random() < 0.5:
        add_lora_triton([y], x, group(a, b), batch)
    else:
        h = lora_shrink_triton(x, a, batch, block_m=16, block_r=16, block_k=16)
        lora_expand_triton(y, h, b, batch, block_m=16, block_n=16, block_r=16)
    check(y, want, dtype)


def make_group(segments, T, d_in, outs, dtype, device, seed=0):
    """A fused group (q/k/v-like) of len(outs) projections, each checked against its own
    single-projection float64 oracle. NaN beyond every slot's rank, as in make_problem."""
    probs = [make_problem(segments, T, d_in, o, dtype, "cpu", seed=seed + p) for p, o in enumerate(outs)]
    x = probs[0][0]
    a = [LoRASlots(pr[1], [pr[2]]).peft_a(0) for pr in probs]
    b = [LoRASlots(pr[1], [pr[2]]).peft_b(0) for pr in probs]
    slots = LoRASlots.from_peft([t.to(device) for t in a], [t.to(device) for t in b])
    ys = [pr[3].to(device) for pr in probs]
    wants = [oracle_add(pr[3].clone(), x, pr[1], pr[2], pr[4]) for pr in probs]
    return x.to(device), slots, ys, wants, LoRABatch.build(segments, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("outs", [(64, 32, 32), (48, 48)], ids=["qkv", "gate_up"])
def test_fused_group_one_shrink_per_slice_expand(dtype, outs, device):
    """One shrink over the interleaved, pre-transposed A of the group, then one expand per slice:
    each slice equals its projection computed alone (mixed ranks, gaps, NaN beyond ranks)."""
    x, slots, ys, wants, batch = make_group(MIXED, MIXED_T, 96, outs, dtype, device)
    assert slots.a.shape == (5, 64 * len(outs), 96)
    add_lora_triton(ys, x, slots, batch)
    for y, want in zip(ys, wants):
        check(y, want, dtype)
    # the torch reference, fused the same way, agrees with the per-projection oracle too
    x2, slots2, ys2, wants2, _ = make_group(MIXED, MIXED_T, 96, outs, dtype, device)
    got = add_lora_ref([y.double() for y in ys2], x2.double(),
                       LoRASlots(slots2.a.double(), [b.double() for b in slots2.b]), batch)
    for y, want in zip(got, wants2):
        check(y, want, torch.float32)


def test_fused_group_skips_untargeted_slices_and_matches_reference(device):
    segs = [(0, 3, 1, 8), (3, 4, 0, 16), (6, 20, 2, 4)]
    x, slots, ys, wants, batch = make_group(segs, 22, 40, (24, 8, 8), torch.float32, device)
    x, ys = x.nan_to_num(0.0), [y.clone() for y in ys]
    k_before = ys[1].clone()
    add_lora_triton([ys[0], None, ys[2]], x, slots, batch)
    assert torch.equal(ys[1], k_before)  # the skipped slice is not touched
    check(ys[0], wants[0], torch.float32)
    check(ys[2], wants[2], torch.float32)
    # shrink writes rank * P interleaved columns; projection p's part is h[:, p::P]
    h = lora_shrink_triton(x, slots.a, batch, 3)
    torch.testing.assert_close(h, lora_shrink_ref(x, slots.a, batch, 3), atol=1e-4, rtol=1e-4)
    k = lora_expand_triton(k_before.clone(), h[:, 1::3], slots.b[1], batch)
    check(k, wants[1], torch.float32)
