"""LoraAdapter -> manifest, and the per-pod push decisions (pure functions)."""
from __future__ import annotations

import base64

import httpx
import pytest

from loraplex.manifest import hash_api_key
from loraplex.operator import adapters as A
from loraplex.operator import constants as C
from loraplex.operator.adapters_sync import (Action, PodRecord, after_error, after_report, backoff, decide,
                                             fresh, next_wakeup)
from loraplex.operator.config import OperatorConfig
from loraplex.operator.engine_client import EngineClient, EngineError, EngineUnreachable, boot_id_of

CFG = OperatorConfig(backoff_base=1.0, backoff_max=8.0, max_failures=3, resync_interval=30, poll_interval=2)


def secret(**data: str) -> dict:
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


# --- manifest building -------------------------------------------------------------------------

def test_manifest_from_spec():
    spec = {"baseModel": "llama", "source": {"type": "hub", "uri": "org/adapter", "revision": "v1",
                                             "sha256": "A" * 64}, "preload": True}
    m = A.build_manifest("support-acme", spec, [])
    assert (m.name, m.source, m.uri, m.revision, m.preload) == ("support-acme", "hub", "org/adapter", "v1", True)
    assert m.sha256 == "a" * 64
    assert A.manifest_json(m)["tenants"] == []


@pytest.mark.parametrize("source, fragment", [
    ({"type": "s3", "uri": "org/repo"}, "s3://bucket"),
    ({"type": "hub", "uri": "s3://bucket/x"}, "repo id"),
    ({"type": "local", "uri": "/x", "revision": "main"}, "revision"),
])
def test_source_must_fit_its_type(source, fragment):
    with pytest.raises(A.SpecProblem) as e:
        A.build_manifest("a", {"source": source}, [])
    assert e.value.reason == "InvalidSource" and fragment in e.value.message


def test_validate():
    A.validate("ok-name", {"baseModel": "b", "rank": 16}, {"engine": {"maxLoraRank": 16}})
    with pytest.raises(A.SpecProblem, match="DNS-1123") as e:
        A.validate("Bad_Name", {}, {})
    assert e.value.reason == "InvalidName"
    with pytest.raises(A.SpecProblem) as e:
        A.validate("a", {"baseModel": "nope"}, None)
    assert e.value.reason == "BaseNotFound"
    with pytest.raises(A.SpecProblem, match="exceeds maxLoraRank 16") as e:
        A.validate("a", {"baseModel": "b", "rank": 64}, {"engine": {"maxLoraRank": 16}})
    assert e.value.reason == "RankTooLarge"
    A.validate("a", {"baseModel": "b", "rank": 64}, {"engine": {}})  # limit unknown: accepted


def test_tenants_are_hashes_of_the_secret_keys():
    refs = A.api_key_refs({"access": {"apiKeySecretRefs": [{"name": "one", "key": "k"}, {"name": "all"}]}})
    hashes = A.tenant_hashes(refs, {"one": secret(k="key-1\n", other="ignored"),
                                    "all": secret(a="key-2", b="key-3")})
    assert hashes == sorted(hash_api_key(k) for k in ("key-1", "key-2", "key-3"))
    assert not any(k in "".join(hashes) for k in ("key-1", "key-2"))


@pytest.mark.parametrize("secrets, reason", [
    ({}, "SecretNotFound"),
    ({"one": None}, "SecretNotFound"),
    ({"one": secret(other="x")}, "SecretKeyNotFound"),
    ({"one": {"data": {"k": "!!!not-base64"}}}, "InvalidSecret"),
    ({"one": secret(k="  ")}, "InvalidSecret"),
])
def test_tenants_fail_closed(secrets, reason):
    refs = [A.SecretKeyRef("one", "k")]
    with pytest.raises(A.SpecProblem) as e:
        A.tenant_hashes(refs, secrets)
    assert e.value.reason == reason


def test_digest_changes_with_the_manifest_only():
    m1 = A.build_manifest("a", {"source": {"type": "hub", "uri": "o/r"}}, [])
    m2 = A.build_manifest("a", {"source": {"type": "hub", "uri": "o/r"}}, [])
    m3 = A.build_manifest("a", {"source": {"type": "hub", "uri": "o/r2"}}, [])
    assert A.manifest_digest(m1) == A.manifest_digest(m2) != A.manifest_digest(m3)


# --- per-pod decisions -------------------------------------------------------------------------

def test_decide_push_on_new_process_or_new_manifest():
    assert decide(None, "boot-1", "d1", 0, CFG) is Action.PUSH
    rec = PodRecord(pod="p", boot_id="boot-1", digest="d1", state="device")
    assert decide(rec, "boot-1", "d1", 0, CFG) is Action.POLL
    assert decide(rec, "boot-2", "d1", 0, CFG) is Action.PUSH, "engine restarted: push again"
    assert decide(rec, "boot-1", "d2", 0, CFG) is Action.PUSH, "manifest changed: push again"


def test_failures_back_off_then_give_up():
    rec = fresh(None, "p", "boot", "d")
    rec = after_report(rec, "failed", "bad adapter_config", now=100, cfg=CFG, attempted=True)
    assert (rec.state, rec.failures, rec.next_attempt) == ("failed", 1, 101.0)
    assert decide(rec, "boot", "d", 100.5, CFG) is Action.WAIT
    assert decide(rec, "boot", "d", 101.0, CFG) is Action.RETRY
    rec = after_report(rec, "failed", "bad adapter_config", now=101, cfg=CFG, attempted=True)
    assert (rec.failures, rec.next_attempt) == (2, 103.0)
    rec = after_report(rec, "failed", "bad adapter_config", now=103, cfg=CFG, attempted=True)
    assert rec.failures == CFG.max_failures
    assert decide(rec, "boot", "d", 10_000, CFG) is Action.WAIT, "given up: no more attempts"
    # ...until the engine restarts or the manifest changes, which starts the count afresh
    assert decide(rec, "boot-2", "d", 10_000, CFG) is Action.PUSH
    assert fresh(rec, "p", "boot-2", "d").failures == 0
    assert fresh(rec, "p", "boot", "d").failures == CFG.max_failures


def test_loading_then_failed_counts_once():
    rec = after_report(fresh(None, "p", "b", "d"), "loading", "", now=0, cfg=CFG, attempted=True)
    assert rec.awaiting and rec.failures == 0
    rec = after_report(rec, "failed", "oom", now=1, cfg=CFG, attempted=False)
    assert rec.failures == 1 and not rec.awaiting
    same = after_report(rec, "failed", "oom", now=2, cfg=CFG, attempted=False)
    assert same.failures == 1, "seeing the same failure again is not a new attempt"


def test_success_resets_the_count():
    rec = after_report(fresh(None, "p", "b", "d"), "failed", "x", now=0, cfg=CFG, attempted=True)
    rec = after_report(rec, "device", "", now=5, cfg=CFG, attempted=True)
    assert (rec.state, rec.failures, rec.next_attempt) == ("device", 0, 0.0)


def test_errors_refusal_vs_unreachable():
    rec = fresh(None, "p", "b", "d")
    refused = after_error(rec, EngineError(422, "rank 128 > --max-lora-rank 64"), now=0, cfg=CFG)
    assert (refused.state, refused.failures, refused.message) == ("failed", 1, "rank 128 > --max-lora-rank 64")
    down = after_error(rec, EngineUnreachable("connection refused"), now=0, cfg=CFG)
    assert (down.state, down.failures, down.streak) == (C.STATE_UNREACHABLE, 0, 1)
    busy = after_error(rec, EngineError(503, "not ready"), now=0, cfg=CFG)
    assert busy.state == C.STATE_UNREACHABLE and busy.failures == 0
    assert decide(down, "b", "d", 100, CFG) is Action.PUSH


def test_backoff_is_capped():
    assert [backoff(n, CFG) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 8, 8]


def test_status_entry_roundtrip():
    rec = PodRecord(pod="p", boot_id="b", digest="d", state="loading", message="m", failures=2)
    again = PodRecord.from_entry(rec.entry(), "d")
    assert (again.pod, again.boot_id, again.state, again.failures, again.awaiting) == ("p", "b", "loading", 2, True)


def test_next_wakeup():
    assert next_wakeup({}, CFG, 0) == 30
    loading = {"p": PodRecord(pod="p", state="loading", awaiting=True)}
    assert next_wakeup(loading, CFG, 0) == 2
    retry = {"p": PodRecord(pod="p", state="failed", failures=1, next_attempt=10.5)}
    assert next_wakeup(retry, CFG, 10) == pytest.approx(0.5)
    given_up = {"p": PodRecord(pod="p", state="failed", failures=3, next_attempt=10.5)}
    assert next_wakeup(given_up, CFG, 10) == 30


# --- the engine client's reading of the contract's shapes --------------------------------------

@pytest.mark.asyncio
async def test_engine_client_reads_states_and_openai_errors():
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/info":
            return httpx.Response(200, json={"boot_id": "b-1", "model_id": "m"})
        if request.method == "PUT" and path == "/v1/adapters/bad":
            return httpx.Response(422, json={"error": {"message": "use_dora is not supported", "type": "invalid",
                                                       "param": None, "code": None}})
        if request.method == "PUT":
            return httpx.Response(200, json={"name": "good", "state": "loading", "message": ""})
        if request.method == "GET" and path == "/v1/adapters/gone":
            return httpx.Response(404, json={"error": {"message": "unknown adapter"}})
        if request.method == "DELETE":
            return httpx.Response(404, json={"error": {"message": "unknown adapter"}})
        return httpx.Response(500, text="boom")

    client = EngineClient(transport=httpx.MockTransport(handler))
    try:
        assert boot_id_of(await client.info("10.0.0.1", 8080)) == "b-1"
        rep = await client.put_adapter("10.0.0.1", 8080, {"name": "good", "source": "hub", "uri": "o/r"})
        assert rep.state == "loading"
        with pytest.raises(EngineError) as e:
            await client.put_adapter("10.0.0.1", 8080, {"name": "bad", "source": "hub", "uri": "o/r"})
        assert (e.value.status, e.value.message, e.value.transient) == (422, "use_dora is not supported", False)
        assert await client.get_adapter("10.0.0.1", 8080, "gone") is None
        assert await client.delete_adapter("10.0.0.1", 8080, "gone") is False
        with pytest.raises(EngineError) as e:
            await client.metrics("10.0.0.1", 8080)
        assert e.value.transient
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_engine_client_unreachable():
    client = EngineClient(timeout=1, connect_timeout=0.5)
    try:
        with pytest.raises(EngineUnreachable):
            await client.info("127.0.0.1", 9)  # discard port: nothing listens
    finally:
        await client.aclose()


def test_admin_token():
    assert A.admin_token_ref({"engine": {}}) is None
    ref = A.admin_token_ref({"engine": {"adminTokenSecretRef": {"name": "adm"}}})
    assert ref == A.SecretKeyRef("adm", "token")
    assert A.admin_token(ref, secret(token="s3cret\n")) == "s3cret"
    with pytest.raises(A.SpecProblem) as e:
        A.admin_token(ref, None)
    assert e.value.reason == "SecretNotFound"
    with pytest.raises(A.SpecProblem) as e:
        A.admin_token(ref, secret(other="x"))
    assert e.value.reason == "SecretKeyNotFound"
    assert EngineError(401, "bad token").transient, "a refused token is not the adapter's failure"
