"""`python -m bench.run --quick` runs end to end and writes its outputs. Timings are never checked."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_writes_json_markdown_and_pngs(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out), "--log-level", "warning"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "results.json").read_text())
    for key in ("meta", "count_sweep", "alpha_sweep", "overhead", "multi_step", "decode_efficiency", "plots"):
        assert key in result, key
    meta = result["meta"]
    assert meta["machine"]["cores"] >= 1 and meta["machine"]["cpu_model"]
    assert meta["quick"] is True
    systems = {e["system"] for e in result["count_sweep"]}
    assert {"loraplex", "transformers+peft"} <= systems
    if importlib.util.find_spec("loraplex.engine.api.cli") is not None:  # the HTTP server exists: it was measured too
        assert "loraplex-http" in systems, result["notes"]
        cat = result["catalog"]  # thousands of adapters on disk, loaded by name just in time
        assert cat and cat["adapters_on_disk"] >= 2000, result["notes"]
        assert cat["catalog"]["errors"] == 0 and cat["one_adapter"]["errors"] == 0, cat["catalog"]["first_error"]
        assert cat["cold_requests"] >= 1 and cat["cold_ttft_p50_s"] is not None and cat["tok_s_ratio"] is not None
    # the base-model ceiling, and every adapter count of the quick sweep for each multi-LoRA system
    assert any(e["system"] == "loraplex" and e["num_adapters"] == 0 for e in result["count_sweep"])
    for system in ("loraplex", "transformers+peft"):
        assert sorted(e["num_adapters"] for e in result["count_sweep"] if e["system"] == system and e["num_adapters"]) == [1, 4]
    for e in result["count_sweep"] + result["alpha_sweep"]:
        m = e["metrics"]
        for k in ("throughput_req_s", "throughput_tok_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_mean_s",
                  "slo_attainment"):
            assert k in m, (e["system"], k)
        assert m["errors"] == 0, (e["system"], m["first_error"])
        assert m["completed"] == m["requests"]
        if e["num_adapters"]:
            assert "ratio_vs_base" in e
    assert any("bound" in e for e in result["count_sweep"])
    assert {"tok_s_ratio", "step_ratio", "bound"} <= set(result["overhead"])
    assert {r["distinct"] for r in result["multi_step"]["rows"] if r["system"] == "loraplex"} >= {0, 1}
    assert {r["distinct"] for r in result["multi_step"]["rows"] if r["system"] == "loraplex (all-linear)"} >= {1}
    for r in result["multi_step"]["rows"]:  # interleaved: medians with their spread, wall and CPU time
        assert {"step_ms", "step_ms_iqr", "ratio", "ratio_iqr", "cpu_ratio", "cpu_ratio_iqr", "steps", "bound"} <= set(r)
        assert r["ratio_iqr"][0] <= r["ratio"] <= r["ratio_iqr"][1]
    assert result["overhead"]["all_linear_step_ratio_iqr"]
    assert result["decode_efficiency"]["rows"] and all("floor_ms" in r for r in result["decode_efficiency"]["rows"])
    fair = result["fairness"]  # two tenants, fcfs against vtc on the same arrivals
    assert fair["fcfs"]["requests"] == fair["vtc"]["requests"] and fair["solo"]["requests"]["heavy"] == 0

    md = (out / "results.md").read_text()
    assert "| system | adapters |" in md and "|---|" in md
    assert "## Decode efficiency" in md and "## Single-adapter overhead" in md
    assert "| loraplex (all-linear) | 1 |" in md and "ratio vs no adapter [IQR]" in md
    assert "## Catalog:" in md
    assert "## Fairness across tenants" in md and "| vtc |" in md

    assert set(result["plots"]) >= {"throughput_vs_adapters.png", "ttft_cdf.png"}
    for name in result["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
