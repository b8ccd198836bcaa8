"""Kernel dispatch (ops.py), and that the Triton kernels compile for a real GPU.

The interpreter runs kernels as Python, so it accepts code the GPU compiler would reject. The
compile test builds every kernel for sm_90 (H100) with Triton's bundled compiler and ptxas,
which needs no GPU; it runs in a subprocess without TRITON_INTERPRET.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from loraplex.kernels import attention_ref, lora_ref, ops
from loraplex.kernels.lora_batch import LoRABatch, LoRASlots

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORAPLEX_KERNELS")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cpu_dispatch_is_torch_and_never_imports_triton():
    r = _run("""
        import sys
        from loraplex.kernels.ops import get_kernel_ops, TORCH_OPS
        assert get_kernel_ops("cpu") is TORCH_OPS
        assert get_kernel_ops("cpu").name == "torch"
        assert not [m for m in sys.modules if m == "triton" or m.startswith("triton.")], "triton imported"
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_env_override(monkeypatch):
    monkeypatch.setenv("LORAPLEX_KERNELS", "torch")
    assert ops.get_kernel_ops("cuda") is ops.TORCH_OPS  # forced even on a GPU device
    monkeypatch.setenv("LORAPLEX_KERNELS", "bogus")
    with pytest.raises(ValueError):
        ops.get_kernel_ops("cpu")
    monkeypatch.delenv("LORAPLEX_KERNELS")
    assert ops.get_kernel_ops("cpu") is ops.TORCH_OPS


def test_forced_triton_runs_the_kernels(monkeypatch, device):
    from loraplex.kernels import triton_attention, triton_lora

    monkeypatch.setenv("LORAPLEX_KERNELS", "triton")
    k = ops.get_kernel_ops(device)
    assert k.name == "triton"
    assert k.add_lora is triton_lora.add_lora_triton
    assert k.paged_decode_attention is triton_attention.paged_decode_attention_triton
    assert k.write_kv is attention_ref.write_kv_ref
    assert k.paged_prefill_attention is attention_ref.paged_prefill_attention_sdpa

    torch.manual_seed(0)
    x = torch.randn(6, 32, device=device)
    slots = LoRASlots(torch.randn(2, 8, 32, device=device), [torch.randn(2, 8, 16, device=device)])
    batch = LoRABatch.build([(0, 2, 1, 8), (3, 6, 0, 4)], device)
    y = torch.randn(6, 16, device=device)
    want = lora_ref.add_lora_ref([y.clone()], x, slots, batch)[0]
    k.add_lora([y], x, slots, batch)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_forced_triton_on_cpu_after_torch_imported_triton():
    """torch._dynamo imports triton before anyone sets TRITON_INTERPRET (the engine's case):
    LORAPLEX_KERNELS=triton must still run the kernels on CPU tensors."""
    r = _run("""
        import os, sys, torch
        import torch._dynamo  # imports triton, without the interpreter
        assert "triton" in sys.modules
        os.environ["LORAPLEX_KERNELS"] = "triton"
        from loraplex.kernels import attention_ref, lora_ref
        from loraplex.kernels.lora_batch import LoRABatch, LoRASlots
        from loraplex.kernels.ops import get_kernel_ops
        k = get_kernel_ops("cpu")
        assert k.name == "triton" and os.environ["TRITON_INTERPRET"] == "1"
        torch.manual_seed(0)
        q = torch.randn(2, 4, 32)
        kc, vc = torch.randn(4, 16, 2, 32), torch.randn(4, 16, 2, 32)
        bt = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
        lens = torch.tensor([20, 5], dtype=torch.int32)
        got = k.paged_decode_attention(q, kc, vc, bt, lens, 0.2)
        want = attention_ref.paged_decode_attention_ref(q, kc, vc, bt, lens, 0.2)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        x, y = torch.randn(5, 32), torch.randn(5, 16)
        slots = LoRASlots(torch.randn(2, 8, 32), [torch.randn(2, 8, 16)])
        batch = LoRABatch.build([(0, 2, 1, 8), (3, 5, 0, 4)], "cpu")
        want = lora_ref.add_lora_ref([y.clone()], x, slots, batch)[0]
        torch.testing.assert_close(k.add_lora([y], x, slots, batch)[0], want, atol=1e-4, rtol=1e-4)
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    r = _run("""
        import inspect, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from loraplex.kernels import triton_lora as L, triton_attention as A

        target = GPUTarget("cuda", 90, 32)

        def compile_(kernel, types, consts):
            sig = {}
            for name in inspect.signature(kernel.fn).parameters:
                sig[name] = "constexpr" if name in consts else types.get(name, "i32")
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target)

        seg = {n: "*i64" for n in ("seg_start_ptr", "seg_end_ptr", "seg_slot_ptr", "seg_rank_ptr")}
        for t, native, prec in (("fp16", True, "tf32"), ("bf16", True, "tf32"), ("fp32", False, "ieee")):
            for num_proj in (1, 3):
                compile_(L._lora_shrink_kernel, {"x_ptr": "*" + t, "a_ptr": "*" + t, "h_ptr": "*fp32", **seg},
                         dict(NUM_PROJ=num_proj, BLOCK_M=16, BLOCK_R=16, BLOCK_K=64, NATIVE_DOT=native,
                              PRECISION=prec))
            compile_(L._lora_expand_kernel, {"h_ptr": "*fp32", "b_ptr": "*" + t, "y_ptr": "*" + t, **seg},
                     dict(BLOCK_M=32, BLOCK_N=64, BLOCK_R=32, PRECISION=prec))
            compile_(A._paged_decode_kernel,
                     {"q_ptr": "*" + t, "k_ptr": "*" + t, "v_ptr": "*" + t, "o_ptr": "*" + t,
                      "bt_ptr": "*i32", "ctx_ptr": "*i32", "qk_scale": "fp32"},
                     dict(GROUP=3, HEAD_DIM=64, BLOCK_SIZE=16, BLOCK_G=16, BLOCK_D=64, BLOCK_N=64,
                          NATIVE_DOT=native, PRECISION=prec))
        print("ok")
    """, timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas in this triton install")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
