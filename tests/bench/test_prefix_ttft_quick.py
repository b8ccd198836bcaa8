"""`python -m bench.prefix_ttft --quick` runs end to end and reports hits. Timings are never checked."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prefix_ttft_quick_writes_its_result(tmp_path):
    out = tmp_path / "prefix_ttft.json"
    proc = subprocess.run([sys.executable, "-m", "bench.prefix_ttft", "--quick", "--prefix-tokens", "200",
                           "--repeats", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    on, off = result["runs"]
    assert on["prefix_caching"] and not off["prefix_caching"]
    # each second request reused the prefix's 12 full blocks (192 tokens); the off engine none
    assert on["prefix_cache_hits"] == 2 * 192 and off["prefix_cache_hits"] == 0
    assert len(on["second_ttft_s"]) == 2 and "speedup_second_vs_first" in result
