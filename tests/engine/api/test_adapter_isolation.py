"""One tenant must never hurt another through the adapter registry and its cache (issue 20,
findings 5, 6 and 11), through HTTP against a real `loraplex-engine` on the tiny model:

- 5: a registration over files that a name loaded just in time already serves takes them over:
  that name and its other spellings get the registration's tenant check from then on;
- 11: every spelling of one folder (`y`, `./y`, `y/`, a symlink) is one entry and one load;
- 6: merged adapters have their own RAM budget (they never pin the host tier full, so other
  adapters keep loading), merges run at most --max-concurrent-merges at once (429 with
  Retry-After beyond), and a request whose adapter does not load in time ends with 503
  `adapter_load_timeout` instead of hanging, counted in /metrics while it waits.
"""
from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from loraplex.manifest import hash_api_key
from tests.engine.api.conftest import (ADMIN, KEY_A, KEY_B, StallingS3, assert_error, engine_process, metric,
                                       parse_metrics, wait_until)

WAIT_TIMEOUT = 5  # --adapter-wait-timeout-seconds of this engine
MERGE_RANK16 = dict(rank=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])


@pytest.fixture(scope="module")
def iso_assets(assets, tmp_path_factory):
    """An adapter folder: x, y, z, cold (copies of a1), link-y (a symlink to y), m3a and m3b (two
    rank-16 adapters to merge), and the bytes one merge of them takes."""
    import torch

    from loraplex.engine.core.adapters.checkpoint import load_adapter
    from loraplex.engine.core.adapters.merge import MergeSpec, merge_adapters
    from loraplex.engine.model.config import ModelConfig
    from bench.tiny import make_tiny_adapter

    root = tmp_path_factory.mktemp("isolation")
    adapters = root / "adapters"
    for name in ("x", "y", "z", "cold"):
        shutil.copytree(assets.adapter_dir / "a1", adapters / name)
    (adapters / "link-y").symlink_to(adapters / "y")
    for name, seed in (("m3a", 41), ("m3b", 42)):
        make_tiny_adapter(assets.base, adapters / name, seed=seed, **MERGE_RANK16)
    cfg = ModelConfig.from_dir(assets.base)
    sources = [load_adapter(adapters / n, cfg, 64, torch.float32) for n in ("m3a", "m3b")]
    merge_bytes = merge_adapters(sources, MergeSpec(("m3a", "m3b"), (1.0, 0.5)), torch.float32).nbytes
    (root / "cache").mkdir()
    return adapters, root / "cache", merge_bytes


@pytest.fixture(scope="module")
def slow_s3():
    s3 = StallingS3()
    yield s3
    s3.close()


@pytest.fixture(scope="module")
def iso_server(assets, iso_assets, slow_s3):
    adapters, cache, merge_bytes = iso_assets
    budget = merge_bytes * 7 // 2  # three merges fit, not four (in the host tier and, now, the merged budget)
    with engine_process("iso_server", [
        "--model-id", str(assets.base), "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "128",
        "--adapter-source", "local", "--adapter-dir", str(adapters), "--adapter-cache-dir", str(cache),
        "--api-keys-file", str(assets.keys_file), "--admin-token-file", str(assets.admin_file),
        "--adapter-host-bytes", str(budget), "--adapter-merged-bytes", str(budget),
        "--max-concurrent-merges", "1", "--adapter-wait-timeout-seconds", str(WAIT_TIMEOUT),
    ], assets.root / "iso_server.log", env={
        "AWS_ENDPOINT_URL": slow_s3.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "OMP_NUM_THREADS": "1",
    }) as proc:
        proc.budget = budget
        yield proc


def generate(server, headers, timeout=30, **parameters) -> httpx.Response:
    return httpx.post(server.url + "/generate", headers=headers, timeout=timeout, json={
        "inputs": "Hello", "parameters": {"max_new_tokens": 2, "details": True, **parameters}})


def scrape(server) -> dict:
    return parse_metrics(httpx.get(server.url + "/metrics", timeout=30).text)


def adapters_listed(server) -> list[dict]:
    return httpx.get(server.url + "/v1/adapters", headers=ADMIN, timeout=30).json()["data"]


def register(server, name: str, **manifest) -> None:
    r = httpx.put(f"{server.url}/v1/adapters/{name}", headers=ADMIN, json=manifest, timeout=30)
    assert r.status_code == 200, r.text


def test_a_registration_takes_over_the_files_that_dynamic_names_serve(iso_server):
    """Finding 5: key-b warmed `x` (and `./x`) by name; the admin then registers `private-x` over
    the same folder for key-a only. Every spelling is private-x from then on, on every route."""
    for name in ("x", "./x"):
        assert generate(iso_server, KEY_B, adapter_id=name).status_code == 200
    register(iso_server, "private-x", source="local", uri="x", tenants=[hash_api_key("key-a")])
    for name in ("x", "./x", "x/", "private-x"):
        # Another tenant's adapter answers as a missing name (finding 12), under the name asked for.
        err = assert_error(generate(iso_server, KEY_B, adapter_id=name), 404, "model_not_found")
        assert name == "private-x" or "private-x" not in err["message"], err
        assert generate(iso_server, KEY_A, adapter_id=name).status_code == 200, name
    chat = httpx.post(iso_server.url + "/v1/chat/completions", headers=KEY_B, timeout=30, json={
        "model": "./x", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert "private-x" not in assert_error(chat, 404, "model_not_found")["message"]
    listed_b = {m["id"] for m in httpx.get(iso_server.url + "/v1/models", headers=KEY_B, timeout=30).json()["data"]}
    assert not listed_b & {"x", "./x", "private-x"}, listed_b
    serving_x = [a["name"] for a in adapters_listed(iso_server) if a["manifest"]["uri"].strip("./") == "x"]
    assert serving_x == ["private-x"], serving_x  # the dynamic entry is gone, not just hidden

    # The same name registered over its own dynamic entry: restricted at once, spellings too.
    assert generate(iso_server, KEY_B, adapter_id="z").status_code == 200
    register(iso_server, "z", source="local", uri="z", tenants=[hash_api_key("key-a")])
    for name in ("z", "./z"):
        assert_error(generate(iso_server, KEY_B, adapter_id=name), 404, "model_not_found")


def test_spellings_of_one_folder_are_one_entry_and_one_load(iso_server):
    """Finding 11: `y`, `./y`, `y/`, `./y/`, `y//` and a symlink to y share one cached copy."""
    before = metric(scrape(iso_server), "loraplex_adapter_loads_total", tier="disk", result="ok")
    tokens = set()
    for name in ("y", "./y", "y/", "./y/", "y//", "link-y"):
        r = generate(iso_server, KEY_A, adapter_id=name)
        assert r.status_code == 200, (name, r.text)
        tokens.add(tuple(t["id"] for t in r.json()["details"]["tokens"]))
    assert len(tokens) == 1
    loads = metric(scrape(iso_server), "loraplex_adapter_loads_total", tier="disk", result="ok") - before
    assert loads == 1, loads
    dynamic = [a for a in adapters_listed(iso_server) if a["dynamic"] and a["manifest"]["uri"].rstrip("/") in
               ("y", "./y", "link-y")]
    assert len(dynamic) == 1, dynamic
    assert_error(generate(iso_server, KEY_A, adapter_id="x/../y"), 400, "invalid_adapter_path")


def merge_request(server, weight: float, ids=("m3a", "m3b"), timeout=30) -> httpx.Response:
    return generate(server, KEY_A, timeout=timeout, merged_adapters={"ids": list(ids), "weights": [1.0, weight]})


def test_merges_have_their_own_budget_and_never_starve_other_adapters(iso_server):
    """Finding 6: four distinct merges, where three fill the budget. Before, merged copies were
    pinned in the host tier: a fourth filled it and every adapter not loaded yet waited forever."""
    register(iso_server, "m3a", source="local", uri="m3a")
    register(iso_server, "m3b", source="local", uri="m3b")
    for w in (0.5, 0.6, 0.7):
        assert merge_request(iso_server, w).status_code == 200
    # The fourth needs room: merges made in the last seconds count as in use, so it may be told to
    # come back (429, Retry-After), and then gets in by pushing out the least recently used one.
    r = merge_request(iso_server, 0.8)
    if r.status_code == 429:
        assert_error(r, 429, "merge_capacity")
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["error_type"] == "overloaded"
        r = wait_until(lambda: (lambda x: x if x.status_code == 200 else None)(merge_request(iso_server, 0.8)),
                       timeout=60, what="the fourth merge once older ones are no longer in use", interval=1.0)
    assert r.status_code == 200, r.text
    # An adapter nobody loaded yet still loads and serves at once (it hung here before).
    t0 = time.monotonic()
    assert generate(iso_server, KEY_A, adapter_id="cold").status_code == 200
    print(f"cold adapter after four merges: {time.monotonic() - t0:.2f} s")
    merged = [a for a in adapters_listed(iso_server) if a["name"].startswith("merged-")]
    assert len(merged) == 3, [a["name"] for a in merged]
    samples = scrape(iso_server)
    assert metric(samples, "loraplex_adapter_budget_bytes", tier="merged") == iso_server.budget
    assert 0 < metric(samples, "loraplex_adapter_bytes", tier="merged") <= iso_server.budget
    assert metric(samples, "loraplex_adapter_bytes", tier="host") <= iso_server.budget


def test_a_request_whose_adapter_does_not_load_ends_with_503_and_is_counted(iso_server, slow_s3):
    """Finding 6: a load that does not finish (here an S3 endpoint that answers nothing) ends its
    request after --adapter-wait-timeout-seconds with 503 and Retry-After; /metrics shows the
    request waiting on the load meanwhile, and nothing once it is gone."""
    register(iso_server, "slow-load", source="s3", uri="s3://bucket/slow-load")
    result: dict = {}

    def call():
        t0 = time.monotonic()
        result["response"] = generate(iso_server, KEY_A, timeout=60, adapter_id="slow-load")
        result["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: metric(scrape(iso_server), "loraplex_num_requests_waiting_for_adapter", reason="load") >= 1,
               timeout=WAIT_TIMEOUT, what="the request counted as waiting on its adapter's load")
    thread.join(60)
    err = assert_error(result["response"], 503, "adapter_load_timeout")
    assert "slow-load" in err["message"] and "--adapter-wait-timeout-seconds" in err["message"]
    assert int(result["response"].headers["Retry-After"]) >= 1
    print(f"adapter wait timed out after {result['seconds']:.2f} s (timeout {WAIT_TIMEOUT} s)")
    assert WAIT_TIMEOUT <= result["seconds"] < WAIT_TIMEOUT + 20
    assert metric(scrape(iso_server), "loraplex_num_requests_waiting_for_adapter", reason="load") == 0


def test_merges_are_capped_and_a_stuck_merge_times_out(iso_server, slow_s3):
    """Finding 6: with --max-concurrent-merges 1, a merge whose source hangs (S3 answers nothing)
    holds the one place: other merges get 429 with Retry-After at once, the stuck request gets 503
    after the wait timeout, and merging works again as soon as the source answers."""
    register(iso_server, "slow-merge", source="s3", uri="s3://bucket/slow-merge")
    seen = slow_s3.requests
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "response", merge_request(iso_server, 1.0, ids=("slow-merge", "m3a"), timeout=60)))
    thread.start()
    wait_until(lambda: slow_s3.requests > seen, timeout=WAIT_TIMEOUT, what="the merge fetching its S3 source")
    busy = merge_request(iso_server, 0.9)
    assert_error(busy, 429, "merge_capacity")
    assert int(busy.headers["Retry-After"]) >= 1 and busy.json()["error_type"] == "overloaded"
    thread.join(60)
    err = assert_error(result["response"], 503, "adapter_load_timeout")
    assert err["param"] == "parameters.merged_adapters"
    assert_error(merge_request(iso_server, 0.9), 429, "merge_capacity")  # the stuck build still holds its place
    slow_s3.release()  # S3 answers (404): the stuck build ends, its place frees
    ok = wait_until(lambda: (lambda x: x if x.status_code == 200 else None)(merge_request(iso_server, 0.9)),
                    timeout=30, what="merging again once the stuck build ended", interval=0.5)
    assert ok.status_code == 200
    assert generate(iso_server, KEY_A, adapter_id="y").status_code == 200  # the engine serves on
