"""`python -m bench.fairness --quick` runs end to end and reports both policies on the same
arrivals. Timings and shares are never checked (a tiny model on a shared machine)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fairness_quick_writes_its_result(tmp_path):
    out = tmp_path / "fairness.json"
    proc = subprocess.run([sys.executable, "-m", "bench.fairness", "--quick", "--window", "12", "--drain", "6",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    point = json.loads(out.read_text())
    solo, fcfs, vtc = point["solo"], point["fcfs"], point["vtc"]
    assert solo["requests"]["heavy"] == 0 and solo["requests"]["light"] > 0
    assert fcfs["requests"] == vtc["requests"] and vtc["requests"]["heavy"] > vtc["requests"]["light"]
    for run in (solo, fcfs, vtc):
        assert run["policy"] in ("fcfs", "vtc") and run["steps"] >= 12
        assert run["light_ttft_p50_steps"] >= 1 and run["light_ttft_p99_steps"] >= run["light_ttft_p50_steps"]
        assert abs(sum(run["share"].values()) - 1) < 1e-9 and run["light_ttft_p99_s"] >= run["light_ttft_p50_s"]
    assert point["setup"]["heavy_req_per_step"] == 10 * point["setup"]["light_req_per_step"]
    assert "| light alone |" in proc.stdout and "| vtc |" in proc.stdout
