"""Run the Triton kernels under Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET=1 is read when a kernel is *defined* (`@triton.jit` at module import picks the
interpreter) and again while an interpreted kernel runs. So, without CUDA, this conftest:
1. sets it just long enough to import the kernel modules (at collection of this folder only),
   then restores the environment, so other test folders see the environment they started with;
2. sets it again, per test, for the tests of this folder only (an autouse fixture here).
With CUDA, nothing is set: the same tests run the compiled kernels on the GPU.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
_KERNEL_MODULES = ("loraplex.kernels.triton_lora", "loraplex.kernels.triton_attention")


def _import_kernels_interpreted() -> None:
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in _KERNEL_MODULES:
            mod = sys.modules.get(name)
            if mod is None:
                importlib.import_module(name)
            elif type(getattr(mod, "_lora_shrink_kernel", getattr(mod, "_paged_decode_kernel", None))
                      ).__name__ != "InterpretedFunction":
                importlib.reload(mod)  # imported elsewhere for a GPU: redefine for the interpreter
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev


if not HAS_CUDA:
    _import_kernels_interpreted()


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def device() -> torch.device:
    return DEVICE
