"""Start-up phases: /health answers while the model loads, /ready and inference say 503 until it
is up; an engine that cannot start makes /health fail and the CLI exit with status 1.

The first two tests run the real app and a real engine under uvicorn in this process, so that
the test can hold the model load at a gate (the factory waits on an Event before building the
LLMEngine).
"""
from __future__ import annotations

import subprocess
import threading

import httpx
import pytest
import uvicorn

from loraplex.engine.api.app import create_app
from loraplex.engine.api.cli import build_parser, configs_from_args
from loraplex.engine.api.settings import ServerSettings
from loraplex.engine.core.config import EngineConfig
from tests.engine.api.conftest import ENGINE_BIN, ROOT, InProcessServer, assert_error, free_port, wait_until


def _engine_factory(model_dir, gate: threading.Event | None = None, **overrides):
    def build():
        from loraplex.engine.core.async_engine import AsyncEngine
        from loraplex.engine.core.config import EngineConfig
        from loraplex.engine.core.llm_engine import LLMEngine

        if gate is not None:
            assert gate.wait(60), "the test never opened the gate"
        cfg = dict(model_id=str(model_dir), device="cpu", num_kv_blocks=64, served_model_name="gated")
        cfg.update(overrides)
        return AsyncEngine(LLMEngine(EngineConfig(**cfg)))

    return build


def test_health_before_the_model_is_loaded(assets):
    gate = threading.Event()
    app = create_app(_engine_factory(assets.base, gate), ServerSettings())
    with InProcessServer(app) as srv:
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 200 and health.json()["model_loaded"] is False
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and ready.json()["model_loaded"] is False
        assert_error(ready, 503, "not_ready")
        body = {"model": "gated", "prompt": "hi", "max_tokens": 2}
        assert_error(httpx.post(srv.url + "/v1/completions", json=body), 503, "not_ready")
        assert_error(httpx.post(srv.url + "/generate", json={"inputs": "hi"}), 503, "not_ready")
        assert_error(httpx.get(srv.url + "/info"), 503, "not_ready")
        assert_error(httpx.get(srv.url + "/v1/models"), 503, "not_ready")
        assert httpx.get(srv.url + "/metrics").status_code == 200
        gate.set()
        wait_until(lambda: httpx.get(srv.url + "/ready").status_code == 200, 60, "/ready after the load")
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(srv.url + "/info").json()["boot_id"]


def test_engine_that_cannot_start(tmp_path):
    failures = []
    settings = ServerSettings(on_fatal=failures.append)
    (tmp_path / "no-such-model").mkdir()  # a folder without a checkpoint
    app = create_app(_engine_factory(tmp_path / "no-such-model"), settings)
    with InProcessServer(app) as srv:
        wait_until(lambda: failures, 30, "on_fatal")
        err = assert_error(httpx.get(srv.url + "/health"), 503, "engine_failed")
        assert "config.json" in err["message"] or "no-such-model" in err["message"], err
        assert httpx.get(srv.url + "/ready").status_code == 503
        assert_error(httpx.post(srv.url + "/v1/completions", json={"prompt": "hi"}), 503, "engine_failed")


def test_cli_exits_1_when_the_engine_cannot_start(tmp_path):
    # an existing folder that holds no checkpoint (a missing one would be looked up on the Hub)
    proc = subprocess.run([str(ENGINE_BIN), "--model-id", str(tmp_path), "--device", "cpu",
                           "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could not be started" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--num-kv-blocks", "4", "--kv-cache-memory-fraction", "0.5"], "not allowed with"),
    (["--device", "tpu"], "invalid choice"),
    (["--tenant-scheduling", "round-robin"], "invalid choice"),
    (["--max-num-seqs", "0"], "positive integer"),
    (["--kv-cache-memory-fraction", "1.5"], "must be in (0, 1]"),
    (["--unknown-flag"], "unrecognized arguments"),
    (["--inject-delay", "support@3"], "must be KEY=SECONDS"),
    (["--inject-delay", "Support=1"], "must be KEY=SECONDS"),
    (["--inject-delay", "support@0=1"], "must be KEY=SECONDS"),
    (["--inject-delay", "support=-1"], "SECONDS must be a number in [0, 60]"),
    (["--inject-delay", "support=61"], "SECONDS must be a number in [0, 60]"),
    (["--inject-delay", "support=soon"], "SECONDS must be a number in [0, 60]"),
    (["--inject-delay", "support=nan"], "SECONDS must be a number in [0, 60]"),
    (["--inject-delay", "s@2=1", "--inject-delay", "s@2=2"], "'s@2' is given twice"),
])
def test_cli_rejects_bad_flags(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--model-id", "x", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_maps_flags_onto_the_configs():
    args = build_parser().parse_args([
        "--model-id", "m", "--served-model-name", "s", "--num-kv-blocks", "12", "--max-waiting", "3",
        "--preload-adapters", "a, b,,c", "--adapter-source", "hub", "--max-lora-rank", "32",
        "--max-body-bytes", "100", "--max-adapter-metric-labels", "5", "--api-keys-file", "k.json",
        "--num-threads", "3", "--tenant-scheduling", "fcfs"])
    config, settings = configs_from_args(args)
    assert (config.model_id, config.served_model_name, config.num_kv_blocks, config.max_waiting) == ("m", "s", 12, 3)
    assert config.preload_adapters == ["a", "b", "c"] and config.adapter_source == "hub" and config.max_lora_rank == 32
    assert (settings.max_body_bytes, settings.max_adapter_metric_labels, settings.api_keys_file) == (100, 5, "k.json")
    assert config.num_threads == 3 and config.tenant_scheduling == "fcfs"
    defaults, default_settings = configs_from_args(build_parser().parse_args(["--model-id", "m"]))
    assert defaults == EngineConfig(model_id="m")
    assert default_settings.inject_delay == {}  # fault injection is off unless asked for
    _, drill = configs_from_args(build_parser().parse_args([
        "--model-id", "m", "--inject-delay", "support@3=1.5", "--inject-delay", "other=0.25"]))
    assert drill.inject_delay == {"support@3": 1.5, "other": 0.25}
