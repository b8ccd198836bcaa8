"""The warm start and the residency metrics of a real `loraplex-engine` process (issue 24).

The engine runs as the operator renders it (--adapter-catalog-url, the admin token, POD_NAME,
--warm-start-budget-seconds); the catalog is a local HTTP server playing the operator's part
(the operator's own placement endpoint is tested in tests/operator/test_catalog_placement.py),
which places three adapters on the pod, hottest first, and holds its answer until the test lets
it go, so that "not Ready while warming" is observed without racing the loads.

- /ready is 503 (status `warming`) until the placed adapters are resident, then 200; /info and
  /metrics tell the warm start's outcome;
- the hottest adapter's first request is warm: the OTLP trace of that request (exported to a
  receiver in the test) has no `adapter_load` phase, and no load from disk happened for it
  (`loraplex_adapter_loads_total{tier="disk"}` unchanged);
- `loraplex_adapter_resident{adapter, tier}` is capped (the most recently used win, the rest
  counted in `..._truncated`) and names restricted adapters only for callers with the token;
- a catalog that never answers: Ready once the budget is spent, `timed_out` in /info.
"""
from __future__ import annotations

import http.server
import json
import threading
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from loraplex.manifest import hash_api_key

from .conftest import ADMIN_TOKEN, METRICS_TOKEN, EngineProcess, free_port, metric, parse_metrics, wait_until

pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk is not installed (engine extra)")
from .otlp_receiver import children_of  # noqa: E402

pytestmark = pytest.mark.slow

PREFIX = "/catalog/v1/team/base"
POD = "base-7d9f-x2k4q"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PLACED = [  # hottest first, as the operator answers
    {"name": "hot", "source": "local", "uri": "a3", "tenants": []},
    {"name": "mid", "source": "local", "uri": "a2", "tenants": []},
    {"name": "private", "source": "local", "uri": "a1", "tenants": [hash_api_key("key-a")]},
]


class PlacementCatalog:
    """GET {PREFIX}/placement/{pod}: `placement`, once `release()` was called (or never, when
    `silent`); GET {PREFIX}/adapters/{name}: 404. Records (pod, Authorization, limit)."""

    def __init__(self, placement: list[dict], silent: bool = False):
        self.placement = placement
        self.silent = silent
        self.released = threading.Event()
        self.closing = threading.Event()
        self.asked: list[tuple[str, str | None, str | None]] = []
        catalog = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                if url.path.startswith(PREFIX + "/placement/"):
                    catalog.asked.append((url.path.rsplit("/", 1)[-1], self.headers.get("Authorization"),
                                          (parse_qs(url.query).get("limit") or [None])[0]))
                    if catalog.silent:
                        catalog.closing.wait(300)  # never answers
                        return
                    catalog.released.wait(300)
                    status, body = 200, {"adapters": catalog.placement, "placed": len(catalog.placement)}
                else:
                    status, body = 404, {"error": {"message": "no such LoraAdapter"}}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{PREFIX}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.closing.set()
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def engine_args(assets, catalog: PlacementCatalog, budget: str) -> list[str]:
    return ["--model-id", str(assets.base), "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "64",
            "--served-model-name", "tiny-base", "--adapter-dir", str(assets.adapter_dir),
            "--api-keys-file", str(assets.keys_file), "--admin-token-file", str(assets.admin_file),
            "--metrics-token-file", str(assets.metrics_file), "--adapter-catalog-url", catalog.url,
            "--warm-start-budget-seconds", budget, "--max-residency-metric-adapters", "2"]



@pytest.fixture(scope="module")
def catalog():
    c = PlacementCatalog(PLACED)
    yield c
    c.close()


@pytest.fixture(scope="module")
def warming_engine(assets, catalog, receiver):
    """Started, not waited for: the test watches it warm."""
    proc = EngineProcess("warm-engine", engine_args(assets, catalog, "120"), assets.root / "warm-engine.log", env={
        "POD_NAME": POD, "OMP_NUM_THREADS": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_LOGS_EXPORTER": "none"})
    try:
        yield proc
    finally:
        proc.stop()


def get(engine, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(engine.url + path, headers=headers, timeout=30)


def samples(engine, token: str | None = ADMIN_TOKEN) -> dict:
    return parse_metrics(get(engine, "/metrics", token).text)


def complete(engine, model: str, key: str = "key-a", headers: dict | None = None) -> httpx.Response:
    return httpx.post(engine.url + "/v1/completions", timeout=120,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})},
                      json={"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0})


def test_a_new_pod_is_ready_only_once_warm_and_serves_its_hottest_adapter_warm(warming_engine, catalog, receiver):
    engine = warming_engine

    def warming():
        if engine.proc.poll() is not None:
            raise AssertionError(f"the engine exited:\n{engine.log_tail()}")
        try:
            r = httpx.get(engine.url + "/ready", timeout=2)
        except httpx.TransportError:
            return None
        return r if r.status_code == 503 and r.json().get("status") == "warming" else None

    # The model is up; the catalog has not answered yet: not Ready, and it says why.
    r = wait_until(warming, 180, "/ready answering 503 warming", interval=0.2)
    body = r.json()
    assert body["error"]["code"] == "not_ready" and "warm start in progress" in body["error"]["message"]
    assert body["warm_start"]["state"] == "fetching" and body["warm_start"]["pod"] == POD
    assert get(engine, "/health").json()["model_loaded"] is True
    assert catalog.asked and catalog.asked[0] == (POD, f"Bearer {ADMIN_TOKEN}", "72")  # 8 slots + 64 host copies

    catalog.released.set()
    engine.wait_ready(120)
    warm = get(engine, "/info").json()["warm_start"]
    assert {k: warm[k] for k in ("state", "budget_seconds", "listed", "resident", "timed_out")} == {
        "state": "done", "budget_seconds": 120.0, "listed": 3, "resident": 3, "timed_out": False}
    assert 0 <= warm["seconds"] <= 120.0
    for name in ("hot", "mid", "private"):  # registered as pushes register them, and resident
        described = get(engine, f"/v1/adapters/{name}", ADMIN_TOKEN).json()
        assert described["dynamic"] is False and described["state"] in ("host", "device"), described
    before = samples(engine)
    assert metric(before, "loraplex_adapter_loads_total", tier="disk", result="ok") == 3
    assert metric(before, "loraplex_warm_start_adapters", state="listed") == 3
    assert metric(before, "loraplex_warm_start_adapters", state="resident") == 3
    assert metric(before, "loraplex_warm_start_timed_out") == 0
    assert ("loraplex_warm_start_seconds", ()) in before

    # The hottest adapter's first request: no load (from disk) for it, no adapter_load phase.
    r = complete(engine, "hot", headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
    assert r.status_code == 200, r.text
    after = samples(engine)
    assert metric(after, "loraplex_adapter_loads_total", tier="disk", result="ok") == 3

    def exported():
        return [s for s in receiver.snapshot() if s["name"] == "llm_request" and s["trace_id"] == TRACE_ID]

    span = wait_until(exported, 30, "the request's llm_request span at the receiver", interval=0.1)[0]
    assert span["attributes"]["loraplex.adapter"] == "hot"
    phases = children_of(receiver.snapshot(), span)
    assert {"queue", "prefill", "decode"} <= set(phases) and "adapter_load" not in phases, phases.keys()


def test_residency_metric_is_capped_most_recent_first_and_redacted(warming_engine):
    engine = warming_engine
    engine.wait_ready(180)  # on its own too: the warm start ends whatever the test above did
    assert complete(engine, "hot").status_code == 200
    assert complete(engine, "private").status_code == 200  # key-a is its tenant: now the most recent
    listing = get(engine, "/v1/adapters", ADMIN_TOKEN).json()["data"]
    tiers = {a["name"]: a["state"] for a in listing if a["state"] in ("host", "device")}
    assert {"hot", "private"} <= set(tiers) and len(tiers) >= 3

    def resident(s: dict) -> dict[str, str]:
        return {dict(labels)["adapter"]: dict(labels)["tier"] for (name, labels), v in s.items()
                if name == "loraplex_adapter_resident" and v == 1}

    for token in (ADMIN_TOKEN, METRICS_TOKEN):  # both may see every name
        s = samples(engine, token)
        assert resident(s) == {"private": tiers["private"], "hot": tiers["hot"]}  # the cap: 2, most recent
        assert metric(s, "loraplex_adapter_resident_truncated") == len(tiers) - 2
    # Without a token: the restricted adapter's name never shows; the open one does.
    text = get(engine, "/metrics").text
    shown = resident(parse_metrics(text))
    assert "hot" in shown and len(shown) == 2
    hidden = next(n for n in shown if n != "hot")
    assert hidden.startswith("restricted-") and "private" not in text
    # The device tier in vLLM's label format: the same redaction applies to its lists.
    info = [dict(labels) for (name, labels), _ in parse_metrics(text).items() if name == "loraplex_lora_resident_info"]
    assert len(info) == 1 and info[0]["max_lora"] == "8"
    on_device = set(filter(None, info[0]["running_lora_adapters"].split(",")))
    assert on_device == {n if n != "private" else hidden for n, t in tiers.items() if t == "device"}


@pytest.fixture(scope="module")
def silent_catalog():
    c = PlacementCatalog(PLACED, silent=True)
    yield c
    c.close()


def test_a_catalog_that_never_answers_costs_the_budget_and_nothing_more(assets, silent_catalog):
    proc = EngineProcess("silent-catalog-engine", engine_args(assets, silent_catalog, "3"),
                         assets.root / "silent-catalog-engine.log", env={"POD_NAME": POD, "OMP_NUM_THREADS": "1"})
    try:
        proc.wait_ready(180)
        warm = get(proc, "/info").json()["warm_start"]
        assert {k: warm[k] for k in ("state", "listed", "resident", "timed_out", "seconds")} == {
            "state": "done", "listed": 0, "resident": 0, "timed_out": True, "seconds": 3.0}
        assert "unreachable" in (warm["message"] or ""), warm  # what the last try met: a read time-out
        assert silent_catalog.asked and silent_catalog.asked[0][0] == POD
        assert metric(samples(proc), "loraplex_warm_start_timed_out") == 1
        assert complete(proc, "tiny-base").status_code == 200  # Ready means serving
    finally:
        proc.stop()
