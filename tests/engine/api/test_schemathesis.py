"""Schemathesis over the engine's own OpenAPI schema: every route, the coverage phase (boundary
and invalid values from the schema) and a bounded fuzzing phase, with one check: no 5xx.

It runs against a dedicated engine (admin routes are open there and may register adapters).
Generation stays small without touching the schema: `--max-model-len 64` bounds what a body
without `max_tokens` generates, and a longer `max_tokens` is refused with a 4xx.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.engine.api.conftest import engine_process, parse_metrics, wait_until

ST = Path(sys.executable).with_name("st")
SEED = 20261130  # fixed: CI reruns the same cases; change it to explore others


@pytest.fixture(scope="module")
def fuzz_server(assets):
    with engine_process("schemathesis", [
        "--model-id", str(assets.base), "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "128",
        "--max-model-len", "64", "--max-waiting", "32", "--adapter-dir", str(assets.adapter_dir),
        "--adapter-cache-dir", str(assets.cache_dir),
    ], assets.root / "schemathesis.log") as proc:
        yield proc


@pytest.mark.slow
def test_no_server_errors_over_the_openapi_schema(fuzz_server, tmp_path):
    if not ST.is_file():
        pytest.fail(f"schemathesis is not installed ({ST}): `make setup` installs the test extra")
    cmd = [str(ST), "run", f"{fuzz_server.url}/openapi.json", "--checks", "not_a_server_error",
           "--phases", "coverage,fuzzing", "--max-examples", "10", "--workers", "1", "--request-timeout", "20",
           "--seed", str(SEED), "--report", "junit", "--report-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "NO_COLOR": "1"},
                          cwd=tmp_path)  # schemathesis keeps a .schemathesis/ cache in its working directory
    out = proc.stdout + proc.stderr
    summary = out[out.rfind("SUMMARY"):] if "SUMMARY" in out else out[-3000:]
    print(summary)
    assert proc.returncode == 0, f"schemathesis found failures (or could not run):\n{out[-6000:]}\n{fuzz_server.log_tail()}"
    assert "Tested: " in summary and " passed" in summary, summary
    # The engine took all that and is idle and whole afterwards.
    assert fuzz_server.proc.poll() is None, fuzz_server.log_tail()

    def idle():
        samples = parse_metrics(httpx.get(fuzz_server.url + "/metrics").text)
        return (samples.get(("loraplex_num_requests_running", ())) == 0
                and samples.get(("loraplex_num_requests_waiting", ())) == 0) or None

    wait_until(idle, 30, "an idle engine after the run")
    server_errors = {k: v for k, v in parse_metrics(httpx.get(fuzz_server.url + "/metrics").text).items()
                     if k[0] == "loraplex_requests_total" and dict(k[1]).get("status", "").startswith("5")}
    assert not any(server_errors.values()), server_errors
