"""Adapters by name from the Hub (a pre-filled cache folder, offline: there is no network here)
and from S3 (moto's S3-compatible server on 127.0.0.1), through HTTP and the real CLI. S3
downloads live in the disk tier: a second load of an evicted adapter reads the cached copy
(the objects are deleted from the bucket in between to prove it)."""
from __future__ import annotations

import shutil
import socket

import httpx
import pytest

from tests.engine.api.conftest import EngineProcess, assert_error, engine_process, metric, parse_metrics

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = ("adapter_config.json", "adapter_model.safetensors")
PROMPT = "Hello"


def completion(server, model: str, n: int = 6) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", timeout=120,
                      json={"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                            "logprobs": 0})


def token_texts(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["logprobs"]["tokens"]


@pytest.fixture(scope="module")
def two_adapters(assets) -> list:
    return [assets.adapter_dir / "a1", assets.adapter_dir / "a2"]


@pytest.fixture(scope="module")
def reference_server(assets):
    """Serves a1 (preloaded) and a2 (by name from --adapter-dir): the reference outputs."""
    with engine_process("reference", ["--model-id", str(assets.base), "--device", "cpu", "--num-threads", "1",
                                      "--num-kv-blocks", "64", "--adapter-dir", str(assets.adapter_dir),
                                      "--preload-adapters", "a1"],
                        assets.root / "reference.log", env={"OMP_NUM_THREADS": "1"}) as proc:
        yield proc


def test_hub_adapter_by_name_from_a_prefilled_cache(assets, two_adapters, tmp_path, reference_server):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--support-lora"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in FILES:
        shutil.copy(two_adapters[0] / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    proc = EngineProcess("hub", ["--model-id", str(assets.base), "--device", "cpu", "--num-threads", "1",
                                 "--num-kv-blocks", "64", "--adapter-source", "hub", "--adapter-cache-dir", str(cache),
                                 "--dynamic-adapters", "on"],
                         tmp_path / "hub.log", env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        proc.wait_ready()
        got = completion(proc, "acme/support-lora")
        assert got.json()["model"] == "acme/support-lora"
        assert token_texts(got) == token_texts(completion(reference_server, "a1"))
        err = assert_error(completion(proc, "acme/absent"), 404, "model_not_found")
        assert "Hugging Face Hub" in err["message"]
        assert_error(completion(proc, "not a repo id"), 400, "invalid_adapter_path")
        info = next(m for m in httpx.get(proc.url + "/v1/models").json()["data"] if m["id"] != "base")
        assert info["root"] == "acme/support-lora"
    finally:
        proc.stop()


@pytest.fixture
def moto_s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env
    server.stop()


def test_s3_adapter_by_name_cached_on_disk(assets, two_adapters, tmp_path, moto_s3, reference_server):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="adapters")
    for name, src in zip(("acme", "beta"), two_adapters):
        for f in FILES:
            s3.upload_file(str(src / f), "adapters", f"tenants/{name}/{f}")
    cache = tmp_path / "cache"
    proc = EngineProcess("s3", ["--model-id", str(assets.base), "--device", "cpu", "--num-threads", "1",
                                "--num-kv-blocks", "64", "--adapter-source", "s3", "--adapter-s3-prefix",
                                "s3://adapters/tenants/", "--adapter-cache-dir", str(cache), "--dynamic-adapters", "on",
                                "--max-active-adapters", "1", "--max-cpu-adapters", "1"],
                         tmp_path / "s3.log", env={**moto_s3, "OMP_NUM_THREADS": "1"})
    try:
        proc.wait_ready()
        first = token_texts(completion(proc, "acme"))
        assert first == token_texts(completion(reference_server, "a1"))
        assert token_texts(completion(proc, "beta")) == token_texts(completion(reference_server, "a2"))
        assert_error(completion(proc, "nobody"), 404, "model_not_found")
        assert_error(completion(proc, "../acme"), 400, "invalid_adapter_path")
        # acme left both tiers for beta (one slot, one host copy). Its objects leave the bucket:
        # only the disk tier can serve it now, and it must not be fetched again.
        for f in FILES:
            s3.delete_object(Bucket="adapters", Key=f"tenants/acme/{f}")
        assert token_texts(completion(proc, "acme")) == first
        samples = parse_metrics(httpx.get(proc.url + "/metrics").text)
        assert metric(samples, "loraplex_adapter_loads_total", tier="s3", result="ok") >= 3  # acme twice, beta
        assert metric(samples, "loraplex_adapter_bytes", tier="disk") > 0
        assert (cache / "s3" / "adapters" / "tenants" / "acme" / ".complete").is_file()
    finally:
        proc.stop()
