"""One pass over one pod (fleet.py): the pure decisions, and the diff against a fake engine
speaking the engine's admin API over httpx's MockTransport."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from loraplex.operator import constants as C
from loraplex.operator.adapters import is_transient
from loraplex.operator.config import OperatorConfig
from loraplex.operator.engine_client import EngineClient, EngineError, EngineUnreachable
from loraplex.manifest import AdapterManifest, AdapterState, manifest_digest
from loraplex.operator.fleet import (Op, Payload, PodMemory, PodRecord, backoff, batches, fold_error, fold_report,
                                     next_wakeup, plan_adapter, sync_pod)
from loraplex.operator.status import PodView

CFG = OperatorConfig(backoff_base=1.0, backoff_max=8.0, max_failures=3, resync_interval=30, poll_interval=2)
SHA_MSG = "sha256 mismatch for adapter_model.safetensors: expected 00, got 11"


def manifest(name: str, uri: str = "org/x") -> dict:
    return {"name": name, "source": "hub", "uri": uri, "preload": False, "tenants": []}


def digest(name: str, uri: str = "org/x") -> str:
    return manifest_digest(AdapterManifest(**manifest(name, uri)))


def listed(name: str, state: str = "registered", message: str | None = None, uri: str = "org/x") -> dict:
    return {"name": name, "state": state, "message": message, "manifest": manifest(name, uri)}


def test_transient_or_permanent_load_failures():
    assert is_transient("could not fetch org/x@main from the Hugging Face Hub: 503 Server Error")
    assert is_transient("could not fetch s3://b/p from S3: Read timeout on endpoint URL")
    assert not is_transient("could not fetch org/x@main from the Hugging Face Hub: 404 Client Error: Repository Not Found")
    assert not is_transient(SHA_MSG)
    assert not is_transient("DoRA adapters (use_dora: true) are not supported")
    assert not is_transient("weight 'x' is for layer 40, but the base model has 2 layers: adapter built for another base")


def test_plan_pushes_what_is_missing_or_different_and_leaves_the_rest():
    rec = PodRecord(pod="p", boot_id="b", digest="d")
    assert plan_adapter(rec, None, manifest("a"), 0, CFG)[0] is Op.PUSH
    op, rec2 = plan_adapter(rec, listed("a", "host"), manifest("a"), 0, CFG)
    assert op is Op.NONE and rec2.state == "host" and rec2.servable
    changed_behind_our_back = {**listed("a"), "manifest": {**manifest("a"), "tenants": []}}
    changed_behind_our_back["manifest"]["uri"] = "evil/x"
    assert plan_adapter(rec, changed_behind_our_back, manifest("a"), 0, CFG)[0] is Op.PUSH
    # Loaded just in time from the catalog (the same manifest): placed here, it is registered.
    jit = {**listed("a", "host"), "dynamic": True}
    assert plan_adapter(rec, jit, manifest("a"), 0, CFG)[0] is Op.PUSH


def test_first_use_failure_counts_retries_and_never_reads_servable_until_a_load_succeeds():
    rec = PodRecord(pod="p", boot_id="b", digest="d", state="registered")
    op, rec = plan_adapter(rec, listed("a", "failed", SHA_MSG), manifest("a"), 100, CFG)
    assert (op, rec.failures, rec.permanent) == (Op.WAIT, 1, True) and rec.next_attempt == 101
    op, _ = plan_adapter(rec, listed("a", "failed", SHA_MSG), manifest("a"), 101, CFG)
    assert op is Op.RETRY
    rec = fold_report(rec, "registered", "", 101, CFG, new_attempt=True)  # the retry's PUT answer
    assert rec.state == "registered" and not rec.servable and "retrying" in rec.message
    for n, t in ((2, 110), (3, 120)):
        op, rec = plan_adapter(rec, listed("a", "failed", SHA_MSG), manifest("a"), t, CFG)
        assert rec.failures == n
        if n < 3:
            rec = fold_report(rec, "registered", "", t + 5, CFG, new_attempt=True)
    assert op is Op.WAIT and rec.failures == CFG.max_failures, "given up on a permanent cause"
    assert plan_adapter(rec, listed("a", "failed", SHA_MSG), manifest("a"), 10_000, CFG)[0] is Op.WAIT
    ok = fold_report(rec, "host", "", 1, CFG, new_attempt=True)
    assert ok.servable and ok.failures == 0


def test_transient_failures_retry_without_end():
    rec = PodRecord(pod="p", boot_id="b", digest="d")
    msg = "could not fetch org/x@main from the Hugging Face Hub: 502 Bad Gateway"
    for i in range(10):
        op, rec = plan_adapter(rec, listed("a", "failed", msg), manifest("a"), 1000.0 * i, CFG)
        assert op is Op.WAIT, i  # the failure is counted, then backed off
        op, rec = plan_adapter(rec, listed("a", "failed", msg), manifest("a"), 1000.0 * i + 500, CFG)
        assert op is Op.RETRY, i
        rec = fold_report(rec, "registered", "", 1000.0 * i + 500, CFG, new_attempt=True)
    assert rec.failures == 10 and not rec.permanent


def test_errors_refusal_vs_unreachable_and_backoff():
    rec = PodRecord(pod="p")
    refused = fold_error(rec, EngineError(422, "rank 128 > --max-lora-rank 64"), 0, CFG)
    assert (refused.state, refused.failures, refused.permanent) == ("failed", 1, True)
    down = fold_error(rec, EngineUnreachable("connection refused"), 0, CFG)
    assert (down.state, down.failures, down.streak) == (C.STATE_UNREACHABLE, 0, 1)
    assert fold_error(rec, EngineError(503, "busy"), 0, CFG).state == C.STATE_UNREACHABLE
    assert [backoff(n, CFG) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 8]


def test_status_entry_roundtrip_and_wakeup():
    rec = PodRecord(pod="p", boot_id="b", digest="d", state="failed", message=SHA_MSG, failures=2)
    again = PodRecord.from_entry(rec.entry(), "d")
    assert (again.boot_id, again.state, again.failures, again.permanent, again.verified) == ("b", "failed", 2, True, False)
    assert next_wakeup([], CFG, 0) == 30
    assert next_wakeup([PodRecord(pod="p", state="loading")], CFG, 0) == 2
    assert next_wakeup([PodRecord(pod="p", state="failed", failures=1, next_attempt=10.5)], CFG, 10) == pytest.approx(0.5)


class FakeEngine:
    """The engine's admin routes over MockTransport, counting calls. `batch=False` plays an engine
    older than POST /v1/adapters:batch and the compact listing (404 and full rows)."""

    def __init__(self, boot: str = "boot-1", batch: bool = True):
        self.boot = boot
        self.batch = batch
        self.adapters: dict[str, dict] = {}
        self.calls: list[str] = []
        self.down = False

    def _register(self, m: dict) -> tuple[int, dict]:
        if m["name"].startswith("refused"):
            return 400, {"error": {"message": "invalid adapter manifest: uri: bad", "type": "invalid_request_error",
                                   "param": "uri", "code": "invalid_manifest"}}
        self.adapters[m["name"]] = {"name": m["name"], "state": "registered", "message": None, "manifest": m}
        return 200, self.adapters[m["name"]]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(f"{request.method} {request.url.path}")
        if self.down:
            raise httpx.ConnectError("connection refused")
        path = request.url.path
        if path == "/info":
            return httpx.Response(200, json={"boot_id": self.boot})
        if path == "/v1/adapters":
            rows = list(self.adapters.values())
            if self.batch and request.url.params.get("view") == "compact":
                rows = [{"name": a["name"], "state": a["state"], "message": a["message"], "dynamic": a.get("dynamic", False),
                         "manifest_digest": manifest_digest(AdapterManifest(**a["manifest"]))} for a in rows]
            return httpx.Response(200, json={"object": "list", "data": rows})
        if path == "/v1/adapters:batch" and self.batch and request.method == "POST":
            rows = []
            for m in json.loads(request.content)["adapters"]:
                status, row = self._register(m)
                rows.append(row if status == 200 else {"name": m["name"], "status": status, **row})
            return httpx.Response(200, json={"object": "list", "data": rows})
        if not path.startswith("/v1/adapters/"):
            return httpx.Response(404, json={"error": {"message": f"no route {path}", "type": "invalid_request_error",
                                                       "param": None, "code": "not_found"}})
        name = path.rsplit("/", 1)[1]
        if request.method == "PUT":
            status, row = self._register(json.loads(request.content))
            return httpx.Response(status, json=row)
        if request.method == "DELETE":
            return httpx.Response(200 if self.adapters.pop(name, None) else 404, json={})
        return httpx.Response(405)


def run_pass(engine: FakeEngine, mem: PodMemory, placed: dict, records: dict, managed: set, moving=frozenset()):
    client = EngineClient(transport=httpx.MockTransport(engine))
    pod = PodView(name="p0", uid="u", ip="10.0.0.1", port=8080, ready=True)

    async def go():
        try:
            return await sync_pod(client, pod, mem, placed, records, managed, CFG, "tok", asyncio.Semaphore(4),
                                  moving)
        finally:
            await client.aclose()
    return asyncio.run(go())


@pytest.mark.parametrize("batch", [True, False], ids=["batch-route", "older-engine"])
def test_sync_pod_pushes_only_the_difference(batch):
    engine = FakeEngine(batch=batch)
    engine.adapters["jit-loaded"] = listed("jit-loaded")        # not ours: left alone
    engine.adapters["moved-off"] = listed("moved-off")          # ours, placed elsewhere now
    engine.adapters["served-jit"] = {**listed("served-jit"), "dynamic": True}  # loaded just in time here
    placed = {f"a{i}": Payload(manifest(f"a{i}"), digest(f"a{i}")) for i in range(50)}
    mem = PodMemory()
    first = run_pass(engine, mem, placed, {}, set(placed) | {"moved-off", "served-jit"})
    assert sorted(first.pushed) == sorted(placed) and first.removed == ["moved-off"]
    assert set(engine.adapters) == set(placed) | {"jit-loaded", "served-jit"}
    # info + listing + (one batch | the batch route's 404 and one PUT each) + one DELETE
    assert first.calls == (2 + 1 + 1 if batch else 2 + 1 + 50 + 1)
    # The next pass over a settled pod: one listing, nothing else (the boot id is cached).
    engine.calls.clear()
    second = run_pass(engine, mem, placed, first.records, set(placed))
    assert engine.calls == ["GET /v1/adapters"] and second.calls == 1 and not second.pushed
    assert all(r.state == "registered" and r.servable for r in second.records.values())
    # Changed behind our back: repaired. Engine restarted (it lost them all): noticed, pushed again.
    engine.adapters["a3"]["manifest"] = {**manifest("a3"), "tenants": []} | {"uri": "evil/x"}
    third = run_pass(engine, mem, placed, second.records, set(placed))
    assert third.pushed == ["a3"]
    engine.adapters.clear()
    engine.boot = "boot-2"
    fourth = run_pass(engine, mem, placed, third.records, set(placed))
    assert fourth.restarted and fourth.boot_id == "boot-2" and len(fourth.pushed) == 50
    engine.down = True
    fifth = run_pass(engine, mem, placed, fourth.records, set(placed))
    assert fifth.error and all(r.state == C.STATE_UNREACHABLE for r in fifth.records.values())


def test_a_moving_adapter_stays_where_it_serves_until_its_new_placement_does():
    """Make-before-break (placement.settled): an adapter placed elsewhere now, whose new pods do
    not all serve it yet (`moving`), is not removed from a pod where it still serves; a failed
    copy is, and so is every copy once the move is done."""
    engine = FakeEngine()
    engine.adapters["leaving"] = listed("leaving", "host")
    engine.adapters["broken"] = listed("broken", "failed", SHA_MSG)
    managed = {"leaving", "broken"}
    mem = PodMemory()
    held = run_pass(engine, mem, {}, {}, managed, moving={"leaving", "broken"})
    assert held.removed == ["broken"] and "leaving" in engine.adapters
    done = run_pass(engine, mem, {}, {}, managed, moving=set())
    assert done.removed == ["leaving"] and not engine.adapters


def test_a_first_push_costs_one_request_per_batch_and_a_refused_manifest_fails_alone():
    engine = FakeEngine()
    names = [f"a{i}" for i in range(450)] + ["refused-1"]
    placed = {n: Payload(manifest(n), digest(n)) for n in names}
    cfg = OperatorConfig(backoff_base=1.0, max_failures=3, push_batch_size=200)
    client = EngineClient(transport=httpx.MockTransport(engine))
    pod = PodView(name="p0", uid="u", ip="10.0.0.1", port=8080, ready=True)

    async def go():
        try:
            return await sync_pod(client, pod, PodMemory(), placed, {}, set(placed), cfg, "tok", asyncio.Semaphore(4))
        finally:
            await client.aclose()
    out = asyncio.run(go())
    assert out.calls == 2 + 3 and engine.calls.count("POST /v1/adapters:batch") == 3  # 451 = 200 + 200 + 51
    assert len(out.pushed) == 450 and out.failed_pushes == 1
    bad = out.records["refused-1"]
    assert bad.state == AdapterState.FAILED and bad.permanent and "invalid adapter manifest" in bad.message


def test_batches_bound_count_and_bytes():
    items = [{"name": f"a{i}", "uri": "x" * 100} for i in range(10)]
    cfg = OperatorConfig(push_batch_size=4, push_batch_bytes=10_000)
    assert [len(b) for b in batches(items, lambda m: m, cfg)] == [4, 4, 2]
    one = len(json.dumps(items[0]))
    cfg = OperatorConfig(push_batch_size=100, push_batch_bytes=3 * one)
    assert [len(b) for b in batches(items, lambda m: m, cfg)] == [3, 3, 3, 1]
    huge = [{"name": "big", "uri": "y" * 10 * one}] + items[:2]
    assert [len(b) for b in batches(huge, lambda m: m, cfg)] == [1, 2]  # too big alone: sent alone
    assert batches([], lambda m: m, cfg) == []


def test_one_backoff_formula_for_pods_the_api_server_and_failed_passes():
    from loraplex.operator import backoff as B
    assert [B.exponential(n, 1.0, 8.0) for n in (0, 1, 2, 3, 4, 5)] == [1, 1, 2, 4, 8, 8]
    assert [backoff(n, CFG) for n in (1, 2, 3)] == [B.exponential(n, CFG.backoff_base, CFG.backoff_max)
                                                    for n in (1, 2, 3)]
    assert B.jittered(4.0, rand=lambda: 0.0) == 2.0 and B.jittered(4.0, rand=lambda: 1.0) == 4.0
