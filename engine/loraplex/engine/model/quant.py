"""Quantized base weights, kept quantized in memory and dequantized for each matmul.

A quantized projection keeps its HF name and its `.weight` attribute: the fp8 tensor is the
`original` of a torch parametrization (`torch.nn.utils.parametrize`) whose forward dequantizes
it, so every module that reads `self.weight` (the LoRA projections, Mixtral's experts) works
unchanged, and LoRA adds its term on top of the dequantized base as it does on a full one.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from loraplex.kernels.ops import fp8_dequantizer


class FP8BlockDequant(nn.Module):
    def __init__(self, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.register_buffer("scale_inv", scale_inv)
        self.block, self.dtype = block, dtype
        self.dequantize = None  # chosen for the device the weights end up on, at first use

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dequantize is None:
            self.dequantize = fp8_dequantizer(weight.device)
        return self.dequantize(weight, self.scale_inv, self.block, self.dtype)


def quantize_module_weight(module: nn.Module, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                           dtype: torch.dtype) -> None:
    """Replace module.weight by the fp8 `weight` (+ its block scales), dequantized on read.
    The loader does it on the meta device, before the checkpoint's tensors are copied in."""
    module.weight = nn.Parameter(weight, requires_grad=False)
    parametrize.register_parametrization(module, "weight", FP8BlockDequant(scale_inv, block, dtype), unsafe=True)


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes the weights take, bytes they would take unquantized in `dtype`); tied ones once."""
    elem = torch.empty(0, dtype=dtype).element_size()
    held = unquantized = 0
    for p in model.parameters():  # remove_duplicate: a tied embedding counts once
        held += p.numel() * p.element_size()
        unquantized += p.numel() * (elem if p.dtype == torch.float8_e4m3fn else p.element_size())
    for m in model.modules():
        if isinstance(m, FP8BlockDequant):
            held += m.scale_inv.numel() * m.scale_inv.element_size()
    return held, unquantized
