"""Adapters by name from the default source (--adapter-source local), through HTTP and the real
CLI: the LoRAX getting-started example verbatim, the OpenAI SDK, bad names, a burst of unknown
names, router metrics, fairness, and a catalog soak over 2,000+ adapters on disk."""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time

import httpx
import pytest

from tests.engine.api.catalog import NUM_CLASSES, make_catalog, rss_bytes
from tests.engine.api.conftest import assert_error, engine_process, metric, parse_metrics, wait_until

CATALOG_SIZE = 2048
MAX_SLOTS = 3
HOST_ADAPTERS = 24  # the host byte budget, in adapters of the largest class
PROMPT = "Hello"


@pytest.fixture(scope="module")
def catalog(assets, tmp_path_factory):
    return make_catalog(assets.base, tmp_path_factory.mktemp("catalog"), CATALOG_SIZE)


@pytest.fixture(scope="module")
def host_budget(catalog) -> int:
    return HOST_ADAPTERS * max((c / "adapter_model.safetensors").stat().st_size for c in catalog.classes)


@pytest.fixture(scope="module")
def catalog_server(assets, catalog, host_budget):
    with engine_process("catalog_server", [
        "--model-id", str(assets.base), "--adapter-source", "local", "--adapter-dir", str(catalog.root),
        "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "256", "--max-num-seqs", "8",
        "--max-active-adapters", str(MAX_SLOTS), "--max-cpu-adapters", "1000", "--adapter-host-bytes", str(host_budget),
        "--max-waiting", "512", "--max-dynamic-adapters", "64", "--adapter-negative-cache-seconds", "600",
    ], assets.root / "catalog_server.log", env={"OMP_NUM_THREADS": "1"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def reference(assets, catalog):
    """Greedy tokens of transformers + PEFT for each weights class: what every name must produce."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.base)
    ids = torch.tensor([tok.encode(PROMPT)])
    out = {}
    for i, path in enumerate(catalog.classes):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.base, dtype=torch.float32), path)
        with torch.no_grad():
            gen = model.eval().generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        out[i] = gen[0, ids.shape[1]:].tolist()
    assert len({tuple(v) for v in out.values()}) == NUM_CLASSES, "the classes must differ for the checks to mean anything"
    return out


def scrape(server) -> dict:
    return parse_metrics(httpx.get(server.url + "/metrics", timeout=30).text)


def lora_info(server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == "vllm:lora_requests_info":
            (sample,) = family.samples
            return {**sample.labels, "value": sample.value}
    raise AssertionError("no vllm:lora_requests_info")


def lorax_ids(server, name: str, n: int = 8) -> list[int]:
    r = httpx.post(server.url + "/generate", timeout=120, json={
        "inputs": PROMPT, "parameters": {"adapter_id": name, "max_new_tokens": n, "details": True, "ignore_eos_token": True}})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def test_lorax_getting_started_example_verbatim(catalog_server, reference):
    # The command, as a new user types it (only the port differs: the test picks a free one),
    # with the JSON content type that LoRAX's own example sends: bodies of another type are 415,
    # since a browser sends form and text/plain bodies cross-site without a preflight (CSRF;
    # docs/api.md "Browsers and cross-site requests").
    url = f"http://127.0.0.1:{catalog_server.port}/generate"
    body = '{"inputs": "Hello", "parameters": {"adapter_id": "tenant-42"}}'
    bare = subprocess.run(["curl", "-s", url, "-d", body], capture_output=True, text=True, timeout=120)
    assert json.loads(bare.stdout)["error"]["code"] == "unsupported_media_type", bare.stdout
    out = subprocess.run(["curl", "-s", url, "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=120)
    body = json.loads(out.stdout)
    assert isinstance(body.get("generated_text"), str) and body["generated_text"], out.stdout

    from lorax import Client

    resp = Client(catalog_server.url, timeout=120).generate(PROMPT, adapter_id="tenant-42", max_new_tokens=8,
                                                            ignore_eos_token=True)
    assert [t.id for t in resp.details.tokens] == reference[0]  # tenant-42 holds class 0's weights
    assert resp.generated_text.startswith(body["generated_text"][:1])
    listed = {m["id"]: m for m in httpx.get(catalog_server.url + "/v1/models").json()["data"]}
    assert listed["tenant-42"]["state"] in ("host", "device")


def test_openai_sdk_with_the_folder_name(catalog_server, reference, tokenizer):
    from openai import OpenAI

    client = OpenAI(base_url=catalog_server.url + "/v1", api_key="unused", timeout=120)
    for name in ("cat-00001", "cat-00006"):  # classes 1 and 2
        resp = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert resp.model == name
        expected = reference[int(name[-5:]) % NUM_CLASSES]
        # (an incomplete UTF-8 tail of random tokens is held back from text; the ids are checked below)
        assert resp.usage.completion_tokens == 8 and tokenizer.decode(expected).startswith(resp.choices[0].text)
        assert lorax_ids(catalog_server, name) == expected
    chat = client.chat.completions.create(model="cat-00003", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "cat-00003" and chat.usage.completion_tokens >= 1


@pytest.mark.parametrize("name,status,code,words", [
    ("no-such-adapter", 404, "model_not_found", "does not exist"),
    ("../classes/class-1", 400, "invalid_adapter_path", "escapes"),
    ("/etc", 400, "invalid_adapter_path", "escapes"),
    ("cat-00001/../../classes/class-1", 400, "invalid_adapter_path", "escapes"),
    ("escape-link", 400, "invalid_adapter_path", "outside the adapter directory"),
    ("not-a-lora", 422, "invalid_adapter", "adapter_config.json"),
    ("prefix-tuning", 422, "invalid_adapter", "PREFIX_TUNING"),
    ("no-weights", 422, "invalid_adapter", "adapter_model.safetensors"),
    ("plain-file", 422, "invalid_adapter", "not a folder"),
])
def test_bad_names(catalog_server, name, status, code, words):
    r = httpx.post(catalog_server.url + "/v1/completions", timeout=60,
                   json={"model": name, "prompt": PROMPT, "max_tokens": 2})
    err = assert_error(r, status, code)
    assert words in err["message"] and err["param"] == "model", err
    lorax = httpx.post(catalog_server.url + "/generate", timeout=60,
                       json={"inputs": PROMPT, "parameters": {"adapter_id": name, "max_new_tokens": 2}})
    assert assert_error(lorax, status, code)["param"] == "parameters.adapter_id"


async def _burst(url: str, names: list[str], concurrency: int = 32) -> list[int]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(name):
            async with sem:
                r = await client.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 1})
                return r.status_code
        return await asyncio.gather(*(one(n) for n in names))


def test_a_burst_of_1000_unknown_names(catalog_server):
    names = [f"unknown-{i:04d}" for i in range(1000)]
    asyncio.run(_burst(catalog_server.url, [f"warm-up-{i}" for i in range(300)]))  # threads, pools, connections
    registry = len(httpx.get(catalog_server.url + "/v1/adapters").json()["data"])
    before, rss = scrape(catalog_server), rss_bytes(catalog_server.proc.pid)
    statuses = asyncio.run(_burst(catalog_server.url, names))
    assert set(statuses) == {404}, sorted(set(statuses))
    again = asyncio.run(_burst(catalog_server.url, names))  # all remembered: no second lookup
    assert set(again) == {404}
    after, rss_after = scrape(catalog_server), rss_bytes(catalog_server.proc.pid)
    lookups = metric(after, "loraplex_adapter_name_lookups_total") - metric(before, "loraplex_adapter_name_lookups_total")
    assert lookups == 1000, lookups
    assert len(httpx.get(catalog_server.url + "/v1/adapters").json()["data"]) == registry
    print(f"\nRSS growth over 2,000 requests for 1,000 unknown names: {(rss_after - rss) / 2**20:.2f} MiB")
    assert rss_after - rss < 32 * 2**20


# ---- router metrics ----------------------------------------------------------------------------

async def _stream_tokens(client: httpx.AsyncClient, name: str, max_tokens: int, on_token=None) -> int:
    """Stream a completion; returns the tokens received (a chunk may carry several: its logprobs
    list them one by one). on_token() is called per token."""
    n = 0
    async with client.stream("POST", "/v1/completions", json={
            "model": name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    for _ in (choice.get("logprobs") or {}).get("tokens", []):
                        n += 1
                        if on_token:
                            on_token(n)
    return n


def test_router_metrics_while_requests_run_and_wait(catalog_server):
    running_names = ["cat-00100", "cat-00101", "cat-00102"]  # one per slot
    waiting_name = "cat-00103"

    async def main():
        async with httpx.AsyncClient(base_url=catalog_server.url, timeout=120) as client:
            started = {n: asyncio.Event() for n in running_names}
            long = [asyncio.create_task(_stream_tokens(client, n, 300, lambda _k, n=n: started[n].set()))
                    for n in running_names]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 60)
            cold = asyncio.create_task(_stream_tokens(client, waiting_name, 2))
            t0 = time.time()
            seen = None
            while not cold.done():
                samples = parse_metrics((await client.get("/metrics")).text)
                info = lora_info(catalog_server)
                if info["waiting_lora_adapters"] and metric(samples, "vllm:num_requests_waiting", model_name="base") >= 1:
                    seen = (samples, info)
                    break
                await asyncio.sleep(0.02)
            assert seen is not None, "never saw the fourth adapter waiting while three ran"
            samples, info = seen
            assert info["max_lora"] == str(MAX_SLOTS)
            assert sorted(info["running_lora_adapters"].split(",")) == running_names
            assert info["waiting_lora_adapters"].split(",") == [waiting_name]
            assert t0 - 1 <= info["value"] <= time.time() + 1  # the value is the report's timestamp
            assert metric(samples, "vllm:num_requests_running", model_name="base") == 3
            assert metric(samples, "vllm:num_requests_waiting", model_name="base") == 1
            assert 0 < metric(samples, "vllm:kv_cache_usage_perc", model_name="base") <= 1
            assert await cold == 2 and all(n == 300 for n in await asyncio.gather(*long))

    asyncio.run(main())
    wait_until(lambda: metric(scrape(catalog_server), "vllm:num_requests_running", model_name="base") == 0, 30, "idle")
    info = lora_info(catalog_server)
    assert info["running_lora_adapters"] == "" and info["waiting_lora_adapters"] == ""
    assert metric(scrape(catalog_server), "vllm:num_requests_waiting", model_name="base") == 0


# ---- fairness --------------------------------------------------------------------------------

def test_a_cold_adapter_is_served_within_the_fairness_bound(catalog_server):
    """Steady traffic keeps every slot pinned by three hot adapters; a request for a fourth must
    still be admitted within the bound of docs/engine.md "Fairness": other adapter requests
    generate at most max_num_seqs x max_tokens tokens between its starvation and its admission.
    Counted in tokens, not seconds (timings do not belong in tests)."""
    hot, cold, hot_tokens, max_num_seqs = ["cat-00200", "cat-00201", "cat-00202"], "cat-00203", 16, 8
    bound = max_num_seqs * hot_tokens + max_num_seqs * 10  # + 10 steps for the cold name's resolve and load
    cap = 3000  # hot tokens after which the hot clients give up (then the cold request would run alone)

    async def main():
        async with httpx.AsyncClient(base_url=catalog_server.url, timeout=120) as client:
            hot_total = 0
            cold_sent_at = cold_first_at = None
            stop = asyncio.Event()

            def count(_n):
                nonlocal hot_total
                hot_total += 1

            async def hot_client(name):
                while not stop.is_set() and hot_total < cap:
                    await _stream_tokens(client, name, hot_tokens, count)

            def cold_token(_n):
                nonlocal cold_first_at
                if cold_first_at is None:
                    cold_first_at = hot_total

            clients = [asyncio.create_task(hot_client(n)) for n in hot for _ in range(2)]
            while hot_total < 100:  # the slots are pinned and the traffic is steady
                await asyncio.sleep(0.01)
            cold_sent_at = hot_total
            await _stream_tokens(client, cold, 2, cold_token)
            stop.set()
            await asyncio.gather(*clients)
            return cold_first_at - cold_sent_at

    between = asyncio.run(main())
    print(f"\nhot tokens generated between the cold request's arrival and its first token: {between} (bound {bound})")
    assert between <= bound


# ---- catalog soak ------------------------------------------------------------------------------

SOAK_REQUESTS = 1200
SOAK_CLIENTS = 24


def soak_jobs(catalog, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, name): Zipf-like popularity over the whole catalog (rank k has weight 1/k^1.1, the
    ranks shuffled over the names), plus unknown names, path escapes and disconnects."""
    names = list(catalog.names)
    rng.shuffle(names)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(names))]
    jobs = []
    for i in range(SOAK_REQUESTS):
        r = rng.random()
        if r < 0.05:
            jobs.append(("unknown", f"ghost-{i}"))
        elif r < 0.07:
            jobs.append(("escape", rng.choice(["../classes/class-0", "/etc", "escape-link"])))
        elif r < 0.12:
            jobs.append(("disconnect", rng.choices(names, weights)[0]))
        else:
            jobs.append((rng.choice(["lorax", "openai", "chat-stream"]), rng.choices(names, weights)[0]))
    return jobs


@pytest.mark.slow
def test_catalog_soak(catalog_server, catalog, reference, host_budget):
    rng = random.Random(7)
    jobs = soak_jobs(catalog, rng)
    statuses: dict[tuple[str, int], int] = {}
    wrong: list[str] = []
    peaks = {"host": 0, "device": 0}
    budgets = {}

    async def run(client, kind, name):
        if kind in ("unknown", "escape", "openai"):
            r = await client.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 4,
                                                           "temperature": 0, "ignore_eos": True})
            if r.status_code == 200 and r.json()["usage"]["completion_tokens"] != 4:
                wrong.append(f"{name}: {r.text[:200]}")
            return r.status_code
        if kind == "lorax":
            r = await client.post("/generate", json={"inputs": PROMPT, "parameters": {
                "adapter_id": name, "max_new_tokens": 4, "details": True, "ignore_eos_token": True}})
            if r.status_code == 200:
                ids = [t["id"] for t in r.json()["details"]["tokens"]]
                if ids != reference[catalog.weights_class(name)][:4]:
                    wrong.append(f"{name}: {ids}")
            return r.status_code
        body = {"model": name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4 if kind != "disconnect" else 200,
                "temperature": 0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if kind == "disconnect" and line.startswith("data: {"):
                    return 499  # leave mid-stream: the server aborts the request
        return status

    async def sample_tiers(client, stop):
        while not stop.is_set():
            s = parse_metrics((await client.get("/metrics")).text)
            for tier in peaks:
                peaks[tier] = max(peaks[tier], metric(s, "loraplex_adapter_bytes", tier=tier))
                budgets[tier] = metric(s, "loraplex_adapter_budget_bytes", tier=tier)
            await asyncio.sleep(0.2)

    async def main(job_list):
        queue = asyncio.Queue()
        for job in job_list:
            queue.put_nowait(job)
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=catalog_server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=SOAK_CLIENTS + 4)) as client:
            sampler = asyncio.create_task(sample_tiers(client, stop))

            async def worker():
                while not queue.empty():
                    kind, name = queue.get_nowait()
                    status = await run(client, kind, name)
                    statuses[(kind, status)] = statuses.get((kind, status), 0) + 1

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(SOAK_CLIENTS))), 600)  # nothing hangs
            stop.set()
            await sampler

    asyncio.run(main(jobs[:100]))  # warm-up: threads, pools, the first loads
    rss_before = rss_bytes(catalog_server.proc.pid)
    started = time.monotonic()
    asyncio.run(main(jobs[100:]))
    seconds = time.monotonic() - started
    wait_until(lambda: metric(scrape(catalog_server), "vllm:num_requests_running", model_name="base") == 0, 60, "idle")
    rss_after = rss_bytes(catalog_server.proc.pid)
    distinct = len({n for k, n in jobs if k in ("lorax", "openai", "chat-stream", "disconnect")})
    print(f"\ncatalog soak: {len(jobs)} requests over {distinct} distinct adapters ({len(catalog.names)} on disk) in "
          f"{seconds:.1f} s after warm-up; statuses {dict(sorted(statuses.items()))}; RSS growth "
          f"{(rss_after - rss_before) / 2**20:.1f} MiB; peak host tier {peaks['host']:.0f} of {budgets['host']:.0f} "
          f"bytes; peak device tier {peaks['device']:.0f} of {budgets['device']:.0f} bytes")

    assert not [s for _, s in statuses if s >= 500], statuses
    expected = {"unknown": 404, "escape": 400, "disconnect": 499, "lorax": 200, "openai": 200, "chat-stream": 200}
    assert all(status == expected[kind] for kind, status in statuses), statuses
    assert not wrong, wrong[:5]
    largest = max((c / "adapter_model.safetensors").stat().st_size for c in catalog.classes)
    assert peaks["host"] <= host_budget + 2 * largest  # + the loads in flight (--adapter-load-workers 2)
    assert peaks["device"] <= budgets["device"]
    assert rss_after - rss_before < 64 * 2**20
    final = scrape(catalog_server)
    assert metric(final, "vllm:num_requests_waiting", model_name="base") == 0
    assert metric(final, "loraplex_num_requests_running") == 0
    info = lora_info(catalog_server)
    assert info["running_lora_adapters"] == "" and info["waiting_lora_adapters"] == ""

    # The registry is bounded by the tiers, not by the catalog: once the names resolved in the
    # last 10 s are past their grace period, it holds what the host and device tiers hold plus at
    # most --max-dynamic-adapters (64) rows that hold nothing.
    def idle_rows():
        rows = httpx.get(catalog_server.url + "/v1/adapters").json()["data"]
        return len([a for a in rows if a["dynamic"] and a["state"] in ("registered", "failed")]), len(rows)

    wait_until(lambda: idle_rows()[0] <= 64, 30, "idle dynamic rows within --max-dynamic-adapters")
    print(f"registry after the soak: {idle_rows()[1]} rows")
