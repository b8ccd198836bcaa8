"""Triton dequantization of block-wise fp8 weights (HF `quant_method: fp8`).

Same semantics as `fp8_ref.dequantize_fp8_blockwise_ref`: out[r, c] = fp8[r, c] *
scale_inv[r // block_out, c // block_in]. The fp8 bytes are read as uint8 and decoded in the
kernel (e4m3fn: 1 sign, 4 exponent bits with bias 7, 3 mantissa bits; exponent 0 is
subnormal; 0x7F / 0xFF are NaN; no infinities). Decoding the bits instead of casting keeps the
kernel runnable under Triton's interpreter (numpy has no fp8) and valid on any GPU, including
ones without native fp8. Grid: tiles of BLOCK_R x BLOCK_C weights; the result is fp32, cast to
the compute dtype by the caller (the interpreter cannot do bf16 arithmetic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_dequant_kernel(w_ptr, s_ptr, o_ptr, rows, cols, scale_cols, block_out, block_in,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    bits = tl.load(w_ptr + r[:, None] * cols + c[None, :], mask=mask, other=0).to(tl.int32)
    sign = tl.where((bits & 0x80) != 0, -1.0, 1.0)
    exponent = (bits >> 3) & 0xF
    mantissa = (bits & 0x7).to(tl.float32)
    normal = (1.0 + mantissa / 8.0) * tl.exp2((exponent - 7).to(tl.float32))
    subnormal = mantissa * (1.0 / 512.0)  # mantissa / 8 * 2 ** (1 - 7)
    value = sign * tl.where(exponent == 0, subnormal, normal)
    value = tl.where((bits & 0x7F) == 0x7F, float("nan"), value)
    scale = tl.load(s_ptr + (r[:, None] // block_out) * scale_cols + c[None, :] // block_in, mask=mask, other=0.0)
    tl.store(o_ptr + r[:, None] * cols + c[None, :], value * scale, mask=mask)


def dequantize_fp8_blockwise_triton(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                                    dtype: torch.dtype) -> torch.Tensor:
    rows, cols = weight.shape
    bits = weight.contiguous().view(torch.uint8)
    scale = scale_inv.float().contiguous()
    out = torch.empty(rows, cols, dtype=torch.float32, device=weight.device)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 64))
    _fp8_dequant_kernel[grid](bits, scale, out, rows, cols, scale.shape[1], block[0], block[1], BLOCK_R=32, BLOCK_C=64)
    return out.to(dtype)
