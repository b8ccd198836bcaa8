"""The Triton fp8 dequantization kernel against the torch reference, in Triton's interpreter
(a subprocess with TRITON_INTERPRET=1: the kernel module must be defined under it), and
compiled for sm_90 without a GPU. Exact: the decode and the scale product are fp32 math."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORAPLEX_KERNELS")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def test_fp8_dequant_kernel_matches_the_reference_in_the_interpreter():
    r = _run("""
        import torch
        from loraplex.kernels.fp8_ref import dequantize_fp8_blockwise_ref, quantize_fp8_blockwise_ref
        from loraplex.kernels.triton_fp8 import dequantize_fp8_blockwise_triton as triton_dequant

        # every one of the 256 byte patterns decodes as torch's own fp8 -> fp32 cast
        every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(16, 16)
        got = triton_dequant(every, torch.ones(1, 1), (16, 16), torch.float32)
        want = every.float()
        assert torch.equal(got.isnan(), want.isnan()) and int(want.isnan().sum()) == 2
        assert torch.equal(got[~got.isnan()], want[~want.isnan()])
        # a weight whose edge blocks are partial, against the reference, bit for bit
        torch.manual_seed(0)
        q, s = quantize_fp8_blockwise_ref(torch.randn(70, 100), (32, 48))
        for dtype in (torch.float32, torch.float16):
            assert torch.equal(triton_dequant(q, s, (32, 48), dtype), dequantize_fp8_blockwise_ref(q, s, (32, 48), dtype))
        # LORAPLEX_KERNELS=triton picks the kernel for a quantized base
        import os
        os.environ["LORAPLEX_KERNELS"] = "triton"
        from loraplex.kernels.ops import fp8_dequantizer
        assert fp8_dequantizer("cpu") is triton_dequant
        print("ok")
    """, interpret=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_fp8_dequant_kernel_compiles_for_sm90():
    r = _run("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from loraplex.kernels.triton_fp8 import _fp8_dequant_kernel as k

        sig = {"w_ptr": "*u8", "s_ptr": "*fp32", "o_ptr": "*fp32", "rows": "i32", "cols": "i32", "scale_cols": "i32",
               "block_out": "i32", "block_in": "i32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
        triton.compile(ASTSource(fn=k, signature=sig, constexprs={"BLOCK_R": 32, "BLOCK_C": 64}),
                       target=GPUTarget("cuda", 90, 32))
        print("ok")
    """, interpret=False)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
