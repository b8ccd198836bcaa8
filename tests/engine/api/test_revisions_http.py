"""Adapter revisions through a real `loraplex-engine` process (issue 23, docs/api.md "Adapter revisions").

Manifests with `revisions` are pushed as the operator pushes them (PUT /v1/adapters/{name}, the
manifest file); requests go over HTTP. Revision 1 serves the tiny adapter a2's weights, revision 2
a3's, so which weights answered is visible in the tokens.

- the split: 500 distinct `user`s land 80/20 within 5 points, a session always gets one
  revision (`user` or x-session-id), no session draws by weight; `x@n` pins, unknown revisions,
  plain adapters and other tenants' adapters answer 404;
- every answer says which revision served it (header on JSON, SSE, chat, LoRAX, errors; LoRAX
  details), and usage records and /metrics count per revision under the adapter's name;
- a stream in flight when its revision is dropped finishes on that revision's weights;
- a revision added to a served name loads at once: its first request loads nothing (no
  `adapter_load` phase in its OTLP trace, no disk load);
- the listing's one row per name (aggregate state, per-revision digests), idempotent pushes,
  plain <-> revisioned, delete, invalid manifests;
- prefix cache blocks are never shared between revisions;
- --inject-delay (rollout drills): a delayed revision's requests wait, counted in its TTFT
  histogram, while the other revision's do not; a plain name's key delays that adapter.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from loraplex.manifest import AdapterManifest, hash_api_key, manifest_digest

from .conftest import ADMIN, KEY_A, KEY_B, EngineProcess, assert_error, metric, parse_metrics, wait_until

pytest.importorskip("opentelemetry.sdk", reason="opentelemetry-sdk is not installed (engine extra)")
from .otlp_receiver import children_of  # noqa: E402

pytestmark = pytest.mark.slow

HEADER = "x-loraplex-adapter-revision"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
DELAY = 0.6  # --inject-delay of the revision `slow@2` and of the plain adapter `lazy`


def revisioned(name: str, *revs: tuple[int, str, int], **extra) -> dict:
    """A manifest serving (number, adapter folder, percent) revisions under `name`."""
    latest = max(revs)[1]
    return {"name": name, "source": "local", "uri": latest, **extra,
            "revisions": [{"number": n, "source": "local", "uri": uri, "percent": p} for n, uri, p in revs]}



@pytest.fixture(scope="module")
def engine(assets, receiver, tmp_path_factory):
    root = tmp_path_factory.mktemp("revisions")
    manifest_file = root / "manifest.json"
    manifest_file.write_text(json.dumps({"adapters": []}))
    proc = EngineProcess("revisions-engine", [
        "--model-id", str(assets.base), "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "256",
        "--served-model-name", "tiny-base", "--adapter-dir", str(assets.adapter_dir),
        "--api-keys-file", str(assets.keys_file), "--admin-token-file", str(assets.admin_file),
        "--adapter-manifest-file", str(manifest_file), "--usage-log", str(root / "usage.jsonl"),
        "--max-num-seqs", "32", "--max-waiting", "256",
        "--inject-delay", f"slow@2={DELAY}", "--inject-delay", f"lazy={DELAY}"], root / "engine.log", env={
        "OMP_NUM_THREADS": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_LOGS_EXPORTER": "none"})
    proc.manifest_file, proc.usage_log = manifest_file, root / "usage.jsonl"
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def put(engine, manifest: dict) -> dict:
    r = httpx.put(f"{engine.url}/v1/adapters/{manifest['name']}", headers=ADMIN, json=manifest, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def complete(engine, model: str, headers: dict | None = None, **body) -> httpx.Response:
    return httpx.post(engine.url + "/v1/completions", headers={**KEY_A, **(headers or {})}, timeout=120, json={
        "model": model, "prompt": "Hello there", "max_tokens": 1, "temperature": 0, **body})


def revision_of(r: httpx.Response) -> int:
    assert r.status_code == 200, r.text
    return int(r.headers[HEADER])


def samples(engine) -> dict:
    return parse_metrics(httpx.get(engine.url + "/metrics", headers=ADMIN, timeout=30).text)


def row(engine, name: str) -> dict | None:
    rows = httpx.get(engine.url + "/v1/adapters?view=compact", headers=ADMIN, timeout=30).json()["data"]
    return next((r for r in rows if r["name"] == name), None)


def test_split_is_sticky_by_session_and_weighted_without_one(engine):
    put(engine, revisioned("split", (1, "a2", 80), (2, "a3", 20)))
    users = [f"user-{i}" for i in range(500)]
    with ThreadPoolExecutor(16) as pool:
        got = dict(zip(users, pool.map(lambda u: revision_of(complete(engine, "split", user=u)), users)))
    share = Counter(got.values())[1] / len(users)
    assert 0.75 <= share <= 0.85, share
    for u in users[:20]:  # the same user, again and again: the same revision
        assert revision_of(complete(engine, "split", user=u)) == got[u]
    # x-session-id sticks too, and comes before `user`
    first = revision_of(complete(engine, "split", headers={"x-session-id": "conversation-7"}))
    for i in range(8):
        assert revision_of(complete(engine, "split", headers={"x-session-id": "conversation-7"}, user=f"u{i}")) == first
    # no session: a weighted draw per request
    with ThreadPoolExecutor(16) as pool:
        drawn = Counter(pool.map(lambda _: revision_of(complete(engine, "split")), range(200)))
    assert set(drawn) == {1, 2} and 0.65 <= drawn[1] / 200 <= 0.95, drawn
    # a canary that grows keeps its sessions: 20 % -> 50 %, everyone on 2 stays on 2
    put(engine, revisioned("split", (1, "a2", 50), (2, "a3", 50)))
    on_two = [u for u in users if got[u] == 2][:20]
    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(lambda u: revision_of(complete(engine, "split", user=u)), on_two)) == {2}
    # rolled back to 100/0: every new request goes to 1 at once, sessions included
    put(engine, revisioned("split", (1, "a2", 100), (2, "a3", 0)))
    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(lambda u: revision_of(complete(engine, "split", user=u)), on_two)) == {1}
    assert revision_of(complete(engine, "split@2")) == 2  # 0 %: still pinnable


def test_pins_and_what_answers_404(engine):
    put(engine, revisioned("pinned", (1, "a2", 100), (3, "a3", 0)))
    put(engine, {"name": "plain", "source": "local", "uri": "a1"})
    put(engine, revisioned("theirs", (1, "a2", 100), tenants=[hash_api_key("key-b")]))
    assert revision_of(complete(engine, "pinned@1")) == 1
    assert revision_of(complete(engine, "pinned@3")) == 3
    err = assert_error(complete(engine, "pinned@9"), 404, "model_not_found")
    assert "'pinned@9'" in err["message"] and "revisions 1, 3" in err["message"], err
    assert err["param"] == "model"
    err = assert_error(complete(engine, "plain@1"), 404, "model_not_found")
    assert "no revisions" in err["message"]
    r = complete(engine, "plain")
    assert r.status_code == 200 and HEADER not in r.headers
    # another tenant's revisioned adapter answers exactly as one that does not exist
    for model, missing in (("theirs", "nobody-has-this"), ("theirs@1", "nobody@1")):
        theirs, nobody = assert_error(complete(engine, model), 404), assert_error(complete(engine, missing), 404)
        assert theirs["message"] == nobody["message"].replace(missing, model) and theirs["code"] == nobody["code"]
    assert revision_of(complete(engine, "theirs@1", headers=KEY_B)) == 1  # its own tenant
    models = {m["id"] for m in httpx.get(engine.url + "/v1/models", headers=KEY_A).json()["data"]}
    assert "pinned" in models and "theirs" not in models and not any("@" in m for m in models)


def test_every_answer_names_its_revision_and_is_counted_per_revision(engine):
    put(engine, revisioned("named", (1, "a2", 0), (2, "a3", 100)))
    before = samples(engine)
    r = complete(engine, "named", max_tokens=3)
    assert revision_of(r) == 2
    body = {"model": "named", "prompt": "Hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", engine.url + "/v1/completions", headers=KEY_A, json=body, timeout=60) as s:
        assert s.status_code == 200 and s.headers[HEADER] == "2"
        assert "[DONE]" in s.read().decode()
    chat = httpx.post(engine.url + "/v1/chat/completions", headers=KEY_A, timeout=60, json={
        "model": "named@1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert revision_of(chat) == 1
    lorax = httpx.post(engine.url + "/generate", headers=KEY_A, timeout=60, json={
        "inputs": "Hi", "parameters": {"adapter_id": "named", "max_new_tokens": 2, "details": True}})
    assert revision_of(lorax) == 2 and lorax.json()["details"]["adapter_revision"] == 2
    with httpx.stream("POST", engine.url + "/generate_stream", headers=KEY_A, timeout=60, json={
            "inputs": "Hi", "parameters": {"adapter_id": "named@1", "max_new_tokens": 2, "details": True}}) as s:
        assert s.headers[HEADER] == "1"
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert events[-1]["details"]["adapter_revision"] == 1
    # an error after resolution says which revision it was for too (max_tokens over the context)
    too_long = complete(engine, "named@2", max_tokens=10_000)
    assert too_long.status_code == 400 and too_long.headers[HEADER] == "2"

    after = samples(engine)
    for revision, n in (("2", 3), ("1", 2)):
        assert metric(after, "loraplex_revision_requests_total", adapter="named", revision=revision, status="200") \
            - metric(before, "loraplex_revision_requests_total", adapter="named", revision=revision, status="200") == n
        assert metric(after, "loraplex_revision_time_to_first_token_seconds_count", adapter="named",
                      revision=revision) == n
    assert metric(after, "loraplex_revision_requests_total", adapter="named", revision="2", status="400") == 1
    assert metric(after, "loraplex_requests_total", adapter="named", status="200") == 5
    assert not any("@" in dict(labels).get("adapter", "") for _, labels in after)

    def records():
        lines = engine.usage_log.read_text().splitlines() if engine.usage_log.exists() else []
        return [json.loads(x) for x in lines if '"named"' in x]

    recs = wait_until(lambda: len(records()) >= 6 and records(), 20, "the usage records")
    digests = {rev["number"]: rev["manifest_digest"] for rev in row(engine, "named")["revisions"]}
    assert {(x["adapter_revision"], x["adapter_digest"]) for x in recs} == {(1, digests[1]), (2, digests[2])}
    assert {x["adapter"] for x in recs} == {"named"}


def test_a_stream_in_flight_finishes_on_its_revision_when_the_revision_is_dropped(engine):
    put(engine, revisioned("inflight", (1, "a2", 100), (2, "a3", 0)))
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    reference = complete(engine, "inflight@1", **body).json()["choices"][0]["text"]
    other = complete(engine, "inflight@2", **body).json()["choices"][0]["text"]
    assert reference != other  # the two revisions' weights answer differently

    started, texts, done = threading.Event(), [], threading.Event()

    def stream():
        with httpx.stream("POST", engine.url + "/v1/completions", headers=KEY_A, timeout=120,
                          json={"model": "inflight", "stream": True, **body}) as s:
            assert s.headers[HEADER] == "1"
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    texts.append(json.loads(line[6:])["choices"][0]["text"])
                    started.set()
        done.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    put(engine, revisioned("inflight", (2, "a3", 100)))  # revision 1 is dropped while the stream runs
    assert not done.is_set(), "the stream ended before the change: the test proves nothing"
    assert [r["number"] for r in row(engine, "inflight")["revisions"]] == [2]
    assert_error(complete(engine, "inflight@1"), 404, "model_not_found")
    reader.join(120)
    assert "".join(texts) == reference
    assert revision_of(complete(engine, "inflight")) == 2


def test_a_revision_added_to_a_served_name_is_warm_before_traffic_shifts(engine, receiver):
    put(engine, revisioned("canary", (1, "a2", 100)))
    assert revision_of(complete(engine, "canary")) == 1
    loads = metric(samples(engine), "loraplex_adapter_loads_total", tier="disk", result="ok")
    put(engine, revisioned("canary", (1, "a2", 100), (2, "a3", 0)))  # warming at 0 %
    wait_until(lambda: row(engine, "canary")["revisions"][0]["state"] in ("host", "device"), 30,
               "revision 2 resident")
    assert metric(samples(engine), "loraplex_adapter_loads_total", tier="disk", result="ok") == loads + 1
    put(engine, revisioned("canary", (1, "a2", 0), (2, "a3", 100)))  # the shift
    r = complete(engine, "canary", headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
    assert revision_of(r) == 2
    assert metric(samples(engine), "loraplex_adapter_loads_total", tier="disk", result="ok") == loads + 1

    def exported():
        return [s for s in receiver.snapshot() if s["name"] == "llm_request" and s["trace_id"] == TRACE_ID]

    span = wait_until(exported, 30, "the request's llm_request span", interval=0.1)[0]
    assert span["attributes"]["loraplex.adapter"] == "canary" and span["attributes"]["loraplex.adapter_revision"] == 2
    phases = children_of(receiver.snapshot(), span)
    assert {"queue", "prefill"} <= set(phases) and "adapter_load" not in phases, phases.keys()


def test_listing_digests_idempotence_and_plain_revisioned_round_trips(engine):
    pushed = revisioned("listed", (1, "a2", 60), (2, "a3", 40))
    manifest = AdapterManifest.model_validate(pushed)
    put(engine, pushed)
    got = row(engine, "listed")
    assert set(got) == {"name", "state", "message", "dynamic", "manifest_digest", "revisions"}
    assert got["manifest_digest"] == manifest_digest(manifest) and got["dynamic"] is False
    assert got["state"] == "registered"  # nothing loaded: no request yet, not served before
    per_revision = {r.number: manifest_digest(m) for r, m in manifest.revision_manifests()}
    assert [(r["number"], r["percent"], r["manifest_digest"]) for r in got["revisions"]] == [
        (2, 40, per_revision[2]), (1, 60, per_revision[1])]
    names = [r["name"] for r in httpx.get(engine.url + "/v1/adapters", headers=ADMIN).json()["data"]]
    assert "listed" in names and not any("@" in n for n in names)
    complete(engine, "listed@1"), complete(engine, "listed@2")
    wait_until(lambda: row(engine, "listed")["state"] in ("host", "device"), 30, "both resident")
    loads = metric(samples(engine), "loraplex_adapter_loads_total", tier="disk", result="ok")
    put(engine, pushed)  # the same manifest again: nothing changes, nothing reloads
    put(engine, {**pushed, "revisions": [{**r, "percent": 100 - r["percent"]} for r in pushed["revisions"]]})
    assert row(engine, "listed")["state"] in ("host", "device")  # a new split alone reloads nothing
    assert metric(samples(engine), "loraplex_adapter_loads_total", tier="disk", result="ok") == loads

    # a failed revision taking traffic makes the name failed, with the reason; at 0 % it does not
    put(engine, revisioned("listed", (1, "a2", 100), (3, "no-such-files", 0)))
    complete(engine, "listed@3")
    wait_until(lambda: row(engine, "listed")["revisions"][0]["state"] == "failed", 30, "revision 3 failed")
    assert row(engine, "listed")["state"] in ("host", "device")
    assert complete(engine, "listed@3").status_code == 424
    put(engine, revisioned("listed", (1, "a2", 50), (3, "no-such-files", 50)))  # a push retries it, as any adapter
    assert complete(engine, "listed@3").status_code == 424
    got = row(engine, "listed")
    assert got["state"] == "failed" and got["message"].startswith("revision 3: "), got

    # revisioned -> plain -> revisioned -> gone
    put(engine, {"name": "listed", "source": "local", "uri": "a1"})
    assert "revisions" not in row(engine, "listed") and HEADER not in complete(engine, "listed").headers
    assert_error(complete(engine, "listed@1"), 404, "model_not_found")
    put(engine, revisioned("listed", (4, "a3", 100)))
    assert revision_of(complete(engine, "listed")) == 4
    assert httpx.delete(engine.url + "/v1/adapters/listed@4", headers=ADMIN).status_code == 404  # not on its own
    assert httpx.delete(engine.url + "/v1/adapters/listed", headers=ADMIN).status_code == 200
    assert row(engine, "listed") is None
    assert_error(complete(engine, "listed@4"), 404, "model_not_found")


def test_the_manifest_file_and_the_batch_route_take_revisions_and_refuse_bad_ones(engine):
    engine.manifest_file.write_text(json.dumps({"adapters": [revisioned("filed", (1, "a2", 30), (2, "a3", 70))]}))
    wait_until(lambda: row(engine, "filed"), 20, "the file's revisioned adapter")
    assert {revision_of(complete(engine, f"filed@{n}")) for n in (1, 2)} == {1, 2}
    r = httpx.post(engine.url + "/v1/adapters:batch", headers=ADMIN, timeout=30, json={"adapters": [
        revisioned("batched", (1, "a2", 100)), revisioned("bad-sum", (1, "a2", 60), (2, "a3", 30))]})
    assert r.status_code == 200
    ok, bad = r.json()["data"]
    assert ok["name"] == "batched" and ok["revisions"][0]["number"] == 1
    assert bad["status"] == 400 and "sum to 100" in bad["error"]["message"], bad
    for manifest, words in ((revisioned("bad", (1, "a2", 50), (2, "a3", 60)), "sum to 100, got 110"),
                            (revisioned("bad", (1, "a2", 50), (1, "a3", 50)), "unique"),
                            (revisioned("bad", (0, "a2", 100)), "greater than or equal to 1"),
                            ({"name": "bad", "uri": "a2", "revisions": []}, "at least one revision")):
        r = httpx.put(engine.url + "/v1/adapters/bad", headers=ADMIN, json=manifest, timeout=30)
        err = assert_error(r, 400, "invalid_manifest")
        assert words in err["message"] and err["param"].startswith("revisions"), err
    assert row(engine, "bad") is None


def test_revisions_never_share_prefix_cache_blocks(engine):
    put(engine, revisioned("cached", (1, "a2", 50), (2, "a3", 50)))
    put(engine, {"name": "ref-a3", "source": "local", "uri": "a3"})  # revision 2's weights, plain
    prompt = "LoRA adapters share one base model; the KV cache is paged in blocks. " * 3  # > 4 blocks of 16
    body = {"prompt": prompt, "max_tokens": 8, "ignore_eos": True}
    want = complete(engine, "ref-a3", **body).json()["choices"][0]["text"]

    def hits():
        return metric(samples(engine), "loraplex_prefix_cache_hits_total")

    first = complete(engine, "cached@1", **body).json()["choices"][0]["text"]
    h = hits()
    got = complete(engine, "cached@2", **body)
    assert hits() == h  # revision 1's blocks are not revision 2's
    assert got.json()["choices"][0]["text"] == want != first
    again = complete(engine, "cached@2", **body)
    assert hits() - h >= 64 and again.json()["choices"][0]["text"] == want  # its own blocks, reused


def test_inject_delay_slows_only_its_key_and_counts_in_its_ttft(engine):
    assert "fault injection is on (--inject-delay)" in engine.log_path.read_text()
    put(engine, revisioned("slow", (1, "a2", 50), (2, "a3", 50)))
    put(engine, {"name": "lazy", "source": "local", "uri": "a1"})
    for model in ("slow@1", "slow@2", "lazy"):  # loaded: what is timed below is the delay, not a load
        assert complete(engine, model).status_code == 200

    def timed(model: str, **body) -> tuple[float, httpx.Response]:
        t0 = time.perf_counter()
        r = complete(engine, model, **body)
        assert r.status_code == 200, r.text
        return time.perf_counter() - t0, r
    before = samples(engine)
    slow = [timed("slow@2")[0] for _ in range(3)]
    fast = [timed("slow@1")[0] for _ in range(3)]
    assert min(slow) >= DELAY, slow
    assert max(fast) < DELAY, fast
    # chosen by the split rather than pinned: the same key, the same delay
    split = [timed("slow", user=f"u{i}") for i in range(8)]
    assert all((t >= DELAY) == (r.headers[HEADER] == "2") for t, r in split), [(t, r.headers[HEADER]) for t, r in split]
    assert timed("lazy")[0] >= DELAY  # a plain adapter's name as the key
    after = samples(engine)

    def mean_ttft(revision: str) -> float:
        sums = [metric(s, "loraplex_revision_time_to_first_token_seconds_sum", adapter="slow", revision=revision)
                for s in (before, after)]
        counts = [metric(s, "loraplex_revision_time_to_first_token_seconds_count", adapter="slow",
                         revision=revision) for s in (before, after)]
        return (sums[1] - sums[0]) / (counts[1] - counts[0])
    assert mean_ttft("2") >= DELAY > mean_ttft("1"), (mean_ttft("2"), mean_ttft("1"))
