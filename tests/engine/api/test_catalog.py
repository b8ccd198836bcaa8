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
from tests.engine.api.conftest import EngineProcess, assert_error, metric, parse_metrics, wait_until

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
    proc = EngineProcess("catalog_server", [
        "--model-id", str(assets.base), "--adapter-source", "local", "--adapter-dir", str(catalog.root),
        "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "256", "--max-num-seqs", "8",
        "--max-active-adapters", str(MAX_SLOTS), "--max-cpu-adapters", "1000", "--adapter-host-bytes", str(host_budget),
        "--max-waiting", "512", "--max-dynamic-adapters", "64", "--adapter-negative-cache-seconds", "600",
    ], assets.root / "catalog_server.log", env={"OMP_NUM_THREADS": "1"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


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
    # The command, as a new user types it (only the port differs: the test picks a free one).
    out = subprocess.run(["curl", "-s", f"http://127.0.0.1:{catalog_server.port}/generate", "-d",
                          '{"inputs": "Hello", "parameters": {"adapter_id": "tenant-42"}}'],
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
