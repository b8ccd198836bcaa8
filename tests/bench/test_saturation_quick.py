"""`python -m bench.saturation --quick` serves the same requests in process and over HTTP, in
turns, and reports each one's throughput and their ratio per round. Timings are never checked."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_saturation_quick_serves_both_sides_and_reports_the_ratio(tmp_path):
    out = tmp_path / "saturation.json"
    proc = subprocess.run([sys.executable, "-m", "bench.saturation", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    point = json.loads(out.read_text())
    assert point["arrivals"] == "all at t = 0" and point["target_modules"].startswith("all-linear")
    assert set(point["systems"]) == {"in-process", "http"}
    rounds = point["rounds"]
    for label, entry in point["systems"].items():
        assert entry["errors"] == 0, (label, entry["first_error"])
        assert len(entry["runs"]) == rounds
        for run in entry["runs"]:  # every request ran to its full length on both sides
            assert run["completed"] == run["requests"] == point["requests"] and run["short_outputs"] == 0
            assert run["throughput_tok_s"] > 0 and run["bench_cpu_s"] is not None
        assert entry["cpu_s_per_1k_tokens"] and entry["beside_step_cpu_s_per_1k_tokens"]
    http = point["systems"]["http"]
    assert len(http["ratio_vs_in_process"]["per_round"]) == rounds
    r = http["ratio_vs_in_process"]
    assert r["min"] <= r["median"] <= r["max"]
    # the server subprocess ran this tree's HTTP layer, not an installed copy
    assert Path(http["source"]).resolve() == ROOT / "engine" / "loraplex" / "engine" / "api" / "lifecycle.py"
    assert "## Saturation: over HTTP against in process" in proc.stdout
