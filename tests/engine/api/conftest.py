"""Real `loraplex-engine` processes for the HTTP tests, shared by the whole session.

- `server`: auth on (API keys for two tenants, an admin token, a metrics token), a watched manifest file,
  `--preload-adapters a1`, a bounded queue (--max-waiting 16) and a small body cap. Its S3
  endpoint is a local server that holds every request until the test releases it, so an
  adapter can be kept "loading" for as long as a test needs, without sleeps.
- `open_server`: no keys, no admin token, per-adapter metric labels capped at 1, browser pages
  of ALLOWED_ORIGIN allowed cross-site (--allowed-origins).

The tiny checkpoint and three PEFT adapters are made in a temp dir by bench/tiny.py.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn

from loraplex.manifest import hash_api_key

ROOT = Path(__file__).resolve().parents[3]
ENGINE_BIN = Path(sys.executable).with_name("loraplex-engine")
KEYS = {"tenant-a": ["key-a"], "tenant-b": ["key-b"]}
ADMIN_TOKEN = "admin-secret-token"
METRICS_TOKEN = "metrics-scraper-token"  # the main server's --metrics-token-file
MAX_WAITING = 16
MAX_BODY_BYTES = 64 * 1024
ALLOWED_ORIGIN = "https://app.example.com"  # the open server's --allowed-origins


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.05):
    """Poll until predicate() is truthy; returns its value. Fails the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    """The response has `status` and the OpenAI error shape; returns the error object."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class InProcessServer:
    """An app served by uvicorn on a thread of this process, on a free loopback port."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn to start")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


class StallingS3:
    """An HTTP endpoint that answers nothing until `release()`, then 404 to everything."""

    def __init__(self):
        self.released = threading.Event()
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _stall(self):
                outer.requests += 1
                outer.released.wait(120)
                self.send_response(404)
                self.send_header("Content-Type", "application/xml")
                body = b"<Error><Code>NoSuchKey</Code><Message>released</Message></Error>"
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = _stall

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def release(self):
        self.released.set()

    def close(self):
        self.released.set()
        self.httpd.shutdown()


@dataclass
class Assets:
    root: Path
    base: Path
    adapter_dir: Path
    cache_dir: Path
    manifest_file: Path
    keys_file: Path
    admin_file: Path
    metrics_file: Path
    adapters: list[str] = field(default_factory=list)


def initial_manifests() -> list[dict]:
    return [
        {"name": "a2", "source": "local", "uri": "a2"},
        {"name": "a3", "source": "local", "uri": "a3"},
        {"name": "private-a", "source": "local", "uri": "a3", "tenants": [hash_api_key("key-a")]},
    ]


def write_manifest_file(path: Path, manifests: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"adapters": manifests}))
    tmp.replace(path)  # atomic, as a ConfigMap update is


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    from bench.tiny import make_tiny_adapter, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("api")
    base = make_tiny_checkpoint(root / "base", family="llama", seed=0)
    adapter_dir = root / "adapters"
    specs = {"a1": dict(rank=4, seed=11), "a2": dict(rank=8, seed=12, target_modules=["q_proj", "v_proj", "o_proj"]),
             "a3": dict(rank=16, seed=13, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])}
    for name, kw in specs.items():
        make_tiny_adapter(base, adapter_dir / name, **kw)
    a = Assets(root=root, base=base, adapter_dir=adapter_dir, cache_dir=root / "cache",
               manifest_file=root / "manifest.json", keys_file=root / "keys.json", admin_file=root / "admin.txt",
               metrics_file=root / "metrics-token.txt", adapters=list(specs))
    a.cache_dir.mkdir()
    write_manifest_file(a.manifest_file, initial_manifests())
    a.keys_file.write_text(json.dumps(KEYS))
    a.admin_file.write_text(ADMIN_TOKEN + "\n")
    a.metrics_file.write_text(METRICS_TOKEN + "\n")
    return a


class EngineProcess:
    def __init__(self, name: str, args: list[str], log_path: Path, env: dict | None = None):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = [str(ENGINE_BIN), *args, "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                return httpx.get(self.url + "/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_until(up, timeout, f"{self.name} /ready", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ---\n{self.log_tail()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop on SIGTERM within 20 s; killing it")
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@contextlib.contextmanager
def engine_process(name: str, args: list[str], log_path: Path, env: dict | None = None):
    """A ready `loraplex-engine` for a test module's own use, stopped afterwards."""
    proc = EngineProcess(name, args, log_path, env=env)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def stalling_s3():
    s3 = StallingS3()
    yield s3
    s3.close()


@pytest.fixture(scope="session")
def _servers(assets, stalling_s3):
    common = ["--model-id", str(assets.base), "--device", "cpu", "--num-kv-blocks", "256",
              "--adapter-dir", str(assets.adapter_dir), "--adapter-cache-dir", str(assets.cache_dir)]
    main = EngineProcess("server", [
        *common, "--served-model-name", "tiny-base",
        "--adapter-manifest-file", str(assets.manifest_file), "--preload-adapters", "a1",
        "--api-keys-file", str(assets.keys_file), "--admin-token-file", str(assets.admin_file),
        "--metrics-token-file", str(assets.metrics_file),
        "--max-num-seqs", "16", "--max-waiting", str(MAX_WAITING), "--max-body-bytes", str(MAX_BODY_BYTES),
    ], assets.root / "server.log", env={
        "AWS_ENDPOINT_URL": stalling_s3.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    open_ = EngineProcess("open_server", [*common, "--max-adapter-metric-labels", "1", "--allowed-origins", ALLOWED_ORIGIN],
                          assets.root / "open.log")
    try:
        main.wait_ready()
        open_.wait_ready()
        yield main, open_
    finally:
        main.stop()
        open_.stop()


@pytest.fixture(scope="session")
def server(_servers) -> EngineProcess:
    return _servers[0]


@pytest.fixture(scope="session")
def open_server(_servers) -> EngineProcess:
    return _servers[1]


@pytest.fixture(scope="session")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.base)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


KEY_A = auth("key-a")
KEY_B = auth("key-b")
ADMIN = auth(ADMIN_TOKEN)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=KEY_A, timeout=60) as c:
        yield c


def shutil_copy_adapter(assets: Assets, src: str, dst: str) -> Path:
    target = assets.adapter_dir / dst
    shutil.copytree(assets.adapter_dir / src, target, dirs_exist_ok=True)
    return target


@pytest.fixture(scope="module")
def receiver():
    """An OTLP/HTTP trace receiver for engines started with OTEL_EXPORTER_OTLP_ENDPOINT at it."""
    from .otlp_receiver import OTLPReceiver
    r = OTLPReceiver()
    yield r
    r.close()
