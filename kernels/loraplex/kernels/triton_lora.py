"""Triton SGMV kernels for heterogeneous multi-LoRA: shrink (x -> h) and expand (h -> y).

Same layout (`lora_batch`) and semantics as `lora_ref` (see their docstrings and docs/kernels.md):
- `x[T, in]`, `y[T, out]`: the batch's tokens; each `LoRABatch` segment is a contiguous run of
  tokens using one adapter slot at one rank; tokens outside every segment get no LoRA term.
- A group of P projections sharing an input (`LoRASlots`): `a[num_slots, max_rank * P, in]`
  (rank-major interleaved: a rank-r segment uses the first r * P rows) and per projection
  `b_p[num_slots, max_rank, out_p]` (pre-transposed, scaling folded in). Both are read along
  their contiguous last axis (coalesced loads).

One shrink launch per group and one expand launch per output slice, each for the whole mixed
batch. The grid is (segment, token tile, output tile); a
program reads its segment's (start, end, slot, rank) from the batch tensors, exits at once when
its tiles are past the segment's end or its rank, and otherwise loops over the rank only up to
the segment's own rank (masks handle the tail). Everything accumulates in fp32; fp16 and bf16
inputs are upcast inside the kernel (or fed to a 16-bit MMA with fp32 accumulation on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels.lora_batch import LoRABatch, LoRASlots

_16BIT = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def ensure_interpreter_stdlib() -> None:
    """Make Triton's own @jit library (tl.zeros, tl.sum, tl.max, ...) callable by the interpreter.

    Those functions are defined when `triton` is first imported, for the interpreter only if
    TRITON_INTERPRET=1 was already set then. torch imports triton on its own (torch._dynamo
    does), often before a test or `LORAPLEX_KERNELS=triton` on a CPU sets the variable; the
    interpreter then fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
    This redefines them as TRITON_INTERPRET=1 at import would have. A no-op when nothing is
    left to convert; only ever called while interpreting.
    """
    import sys

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    converted: dict[int, InterpretedFunction] = {}

    def convert(owner, name, fn) -> None:
        if id(fn) not in converted:  # one object per function: the interpreter compares by identity
            converted[id(fn)] = InterpretedFunction(fn.fn)
        setattr(owner, name, converted[id(fn)])

    for mod_name, mod in list(sys.modules.items()):
        if mod is not None and (mod_name == "triton.language" or mod_name.startswith("triton.language.")):
            for name, obj in list(vars(mod).items()):
                if type(obj) is JITFunction:
                    convert(mod, name, obj)
    for name, obj in list(vars(tl.core.tensor).items()):
        if type(obj) is JITFunction:
            convert(tl.core.tensor, name, obj)


def _dot_mode(a: torch.Tensor, b: torch.Tensor, act_dtype: torch.dtype) -> tuple[bool, str]:
    """(native 16-bit MMA?, precision of fp32 MMAs).

    On a GPU, two operands of the same 16-bit dtype go to the tensor cores as they are (their
    products are exact in fp32, accumulation is fp32). Otherwise both are upcast to fp32: exact
    IEEE for fp32 models, TF32 for 16-bit models (its error is below the output's rounding).
    The interpreter always upcasts (its bf16 arithmetic is broken) and ignores the precision.
    """
    if interpreting():
        return False, "ieee"
    native = a.dtype == b.dtype and a.dtype in _16BIT
    return native, ("tf32" if act_dtype in _16BIT else "ieee")


if interpreting():
    ensure_interpreter_stdlib()


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    seg_start_ptr, seg_end_ptr, seg_slot_ptr, seg_rank_ptr,
    K,
    stride_xm, stride_xk,
    stride_as, stride_ak, stride_ar,
    stride_hm, stride_hr,
    NUM_PROJ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """h[t, c] = sum_k x[t, k] * a[slot, c, k] for the segment's tokens t and c < rank * NUM_PROJ."""
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_end_ptr + seg)
    rank = tl.load(seg_rank_ptr + seg) * NUM_PROJ  # the group's columns for this segment
    m0 = start + pid_m * BLOCK_M
    r0 = pid_r * BLOCK_R
    # Past this segment's tokens or its rank: nothing to do (no compute padded to max_rank).
    if (m0 < end) & (r0 < rank):
        slot = tl.load(seg_slot_ptr + seg)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < end
        r_mask = offs_r < rank
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [M, K]
        a_ptrs = a_ptr + slot * stride_as + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # [K, R]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            if NATIVE_DOT:
                acc = tl.dot(xt, at, acc)
            else:
                acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
        tl.store(h_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_expand_kernel(
    h_ptr, b_ptr, y_ptr,
    seg_start_ptr, seg_end_ptr, seg_slot_ptr, seg_rank_ptr,
    N,
    stride_hm, stride_hr,
    stride_bs, stride_br, stride_bn,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y[t, n] += sum_{r < rank} h[t, r] * b[slot, r, n] for the segment's tokens t. In place."""
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_end_ptr + seg)
    rank = tl.load(seg_rank_ptr + seg)
    m0 = start + pid_m * BLOCK_M
    if (m0 < end) & (rank > 0):
        slot = tl.load(seg_slot_ptr + seg)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        m_mask = offs_m < end
        n_mask = offs_n < N
        h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr  # [M, R]
        b_ptrs = b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # [R, N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # The rank loop stops at this segment's rank, not at the batch's max_rank.
        for r0 in range(0, rank, BLOCK_R):
            r_mask = (r0 + offs_r) < rank
            ht = tl.load(h_ptrs, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(ht.to(tl.float32), bt.to(tl.float32), acc, input_precision=PRECISION)
            h_ptrs += BLOCK_R * stride_hr
            b_ptrs += BLOCK_R * stride_br
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        y_mask = m_mask[:, None] & n_mask[None, :]
        yt = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (yt + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _block_m(batch: LoRABatch) -> int:
    # 16 is the smallest MMA tile; decode-heavy batches have 1-token segments.
    return _pow2(batch.max_seg_len, 16, 64 if interpreting() else 32)


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, batch: LoRABatch, num_proj: int = 1, *,
                       out: torch.Tensor | None = None, block_m: int | None = None,
                       block_r: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """h[T, max(max_rank * P, 1)] fp32 = x[t] @ a[slot(t), :rank*P].T; zero outside segments and
    beyond each segment's columns. `lora_a` is a group's `[num_slots, max_rank * P, in]` buffer.

    With `out` given (an fp32 [T, >= max_rank * P] buffer), only the segments' [rows, :rank*P]
    are written and the rest of `out` is left as it was (add_lora uses this to skip a memset).
    """
    T, K = x.shape
    cols = batch.max_rank * num_proj
    if out is None:
        out = torch.zeros(T, max(cols, 1), dtype=torch.float32, device=x.device)
    if batch.empty or batch.max_rank == 0 or T == 0:
        return out
    assert lora_a.shape[2] == K and lora_a.shape[1] >= cols
    bm = block_m or _block_m(batch)
    # Column tiles of 16 (the smallest MMA width): a rank-4 segment of a single projection runs
    # one 16-wide tile, a rank-64 one four tiles; programs whose tile starts past their
    # segment's columns exit.
    br = block_r or 16
    bk = block_k or _pow2(K, 16, 256 if interpreting() else 64)
    native, prec = _dot_mode(x, lora_a, x.dtype)
    grid = (len(batch.segments), triton.cdiv(batch.max_seg_len, bm), triton.cdiv(cols, br))
    _lora_shrink_kernel[grid](
        x, lora_a, out,
        batch.seg_start, batch.seg_end, batch.seg_slot, batch.seg_rank,
        K,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(2), lora_a.stride(1),  # slot, k, column (= row of a)
        out.stride(0), out.stride(1),
        NUM_PROJ=num_proj, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, NATIVE_DOT=native, PRECISION=prec,
    )
    return out


def lora_expand_triton(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, batch: LoRABatch, *,
                       block_m: int | None = None, block_n: int | None = None,
                       block_r: int | None = None) -> torch.Tensor:
    """y[t] += h[t, :rank] @ b[slot(t), :rank] for every token t inside a segment. In place;
    returns y. `h` is this projection's part of the shrink output (for a group of P, the strided
    view `h[:, p::P]`); `lora_b` is `[num_slots, max_rank, out]`."""
    T, N = y.shape
    if batch.empty or batch.max_rank == 0 or T == 0:
        return y
    assert lora_b.shape[2] == N and lora_b.shape[1] >= batch.max_rank and h.shape[1] >= batch.max_rank
    bm = block_m or _block_m(batch)
    bn = block_n or _pow2(N, 16, 256 if interpreting() else 64)
    br = block_r or _pow2(batch.max_rank, 16, 64 if interpreting() else 32)
    _, prec = _dot_mode(h, lora_b, y.dtype)
    grid = (len(batch.segments), triton.cdiv(batch.max_seg_len, bm), triton.cdiv(N, bn))
    _lora_expand_kernel[grid](
        h, lora_b, y,
        batch.seg_start, batch.seg_end, batch.seg_slot, batch.seg_rank,
        N,
        h.stride(0), h.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, PRECISION=prec,
    )
    return y


def shrink_group_triton(x: torch.Tensor, slots: LoRASlots, batch: LoRABatch) -> torch.Tensor | None:
    """The group's shrink: one launch into an fp32 scratch h[T, max_rank * P] (not zeroed: each
    expand reads only what the shrink wrote). None when there is nothing to do."""
    if batch.empty or batch.max_rank == 0 or x.shape[0] == 0:
        return None
    h = torch.empty(x.shape[0], batch.max_rank * slots.num_proj, dtype=torch.float32, device=x.device)
    return lora_shrink_triton(x, slots.a, batch, slots.num_proj, out=h)


def expand_group_triton(y: torch.Tensor, h: torch.Tensor | None, slots: LoRASlots, p: int,
                        batch: LoRABatch) -> torch.Tensor:
    """Projection p's expand: one launch reading its strided view h[:, p::P]. In place; returns y."""
    if h is None:
        return y
    return lora_expand_triton(y, h[:, p::slots.num_proj], slots.b[p], batch)


def add_lora_triton(ys: list[torch.Tensor | None], x: torch.Tensor, slots: LoRASlots,
                    batch: LoRABatch) -> list[torch.Tensor | None]:
    """ys[p][t] += B_p,slot(t) @ (A_p,slot(t) @ x[t]) for every token t inside a segment, for each
    projection p whose `ys[p]` is not None. In place: one shrink launch for the whole group, then
    one expand launch per output slice."""
    h = shrink_group_triton(x, slots, batch)
    for p, y in enumerate(ys):
        if y is not None:
            expand_group_triton(y, h, slots, p, batch)
    return ys
