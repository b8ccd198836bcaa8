"""Torch reference for block-wise fp8 weights (HF `quant_method: fp8`, `weight_block_size`).

A weight [out, in] is stored as float8_e4m3fn with one fp32 multiplier per block of
block_out x block_in (`weight_scale_inv`, [ceil(out / block_out), ceil(in / block_in)]): the
real weight is `fp8 * scale_inv` of its block. Qwen3-FP8 and DeepSeek-V3 ship this format.
"""
from __future__ import annotations

import torch


def dequantize_fp8_blockwise_ref(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                                 dtype: torch.dtype) -> torch.Tensor:
    out_features, in_features = weight.shape
    bo, bi = block
    scale = scale_inv.float().repeat_interleave(bo, 0)[:out_features].repeat_interleave(bi, 1)[:, :in_features]
    return (weight.float() * scale).to(dtype)


def quantize_fp8_blockwise_ref(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for making test checkpoints: (fp8 weight, scale_inv) with each block's
    largest magnitude mapped to fp8's largest finite value (448)."""
    out_features, in_features = weight.shape
    bo, bi = block
    rows, cols = -(-out_features // bo), -(-in_features // bi)
    padded = torch.zeros(rows * bo, cols * bi, dtype=torch.float32)
    padded[:out_features, :in_features] = weight.float()
    blocks = padded.view(rows, bo, cols, bi)
    scale_inv = (blocks.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    q = (blocks / scale_inv[:, None, :, None]).view(rows * bo, cols * bi)[:out_features, :in_features]
    return q.to(torch.float8_e4m3fn), scale_inv
