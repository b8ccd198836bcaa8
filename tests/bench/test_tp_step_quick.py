"""`python -m bench.tp_step --quick` runs sizes 1 and 2 end to end with equal greedy tokens. Timings are never checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two engines, one of them with a worker process
def test_tp_step_quick_writes_its_result(tmp_path):
    out = tmp_path / "tp_step.json"
    proc = subprocess.run([sys.executable, "-m", "bench.tp_step", "--quick", "--batch", "4", "--steps", "6",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["tensor_parallel_size"] for r in result["runs"]] == [1, 2] and result["tokens_equal"]
    assert all(r["decode_steps"] >= 4 for r in result["runs"])
