"""`python -m bench.gpu_check --quick` (the CPU mode of `make gpu-check`) runs end to end: kernel
checks under the Triton interpreter, Triton-vs-torch engine parity on a random model with random
PEFT adapters, and the decode sweep's code. Timings are never checked."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_quick_mode_passes_and_writes_json(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--quick", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["ok"] and result["quick"]
    names = {r["check"] for r in result["kernels"]}
    assert {"lora qkv (P=3)", "lora gate_up (P=2)", "lora o (P=1)", "lora down (P=1)"} <= names
    assert any(n.startswith("decode attention") for n in names) and any(n.startswith("prefill sdpa") for n in names)
    assert {r["dtype"] for r in result["kernels"]} == {"float16", "bfloat16"}
    assert result["parity"]["identical"] == result["parity"]["sequences"] > 0
    assert {(r["batch"], r["distinct"]) for r in result["decode_sweep"]} == {(2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2)}
    assert result["prefill_tok_s"] > 0
    assert "| batch | distinct adapters |" in proc.stdout
