"""Adapter sources: the HF Hub (offline, from a pre-filled cache folder: there is no network
here) and S3 (a real boto3 client against moto's S3-compatible server on 127.0.0.1)."""
import shutil

import pytest

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.manifest import AdapterManifest
from tests.engine.core.conftest import PROMPTS
from tests.engine.adapters.conftest import make_engine
from tests.support.s3 import local_s3

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
FILES = ("adapter_config.json", "adapter_model.safetensors")


def reference_tokens(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]))
    engine.adapters.register(AdapterManifest(name="ref", uri=str(tiny_adapters["llama"] / "qv-r4")))
    return engine.generate([PROMPTS[0]], GREEDY, ["ref"])[0]["token_ids"]


def test_hub_source_from_the_hub_cache_offline(tiny_models, tiny_adapters, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    # The layout huggingface_hub writes: models--org--name/{refs/<rev>, snapshots/<commit>/...}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / "models--acme--support-lora"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in FILES:
        shutil.copy(tiny_adapters["llama"] / "qv-r4" / f, snap / f)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "v1").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    engine = make_engine(tiny_models["llama"], adapter_cache_dir=str(tmp_path / "hub"))
    engine.adapters.register(AdapterManifest(name="from-hub", source="hub", uri="acme/support-lora", revision="v1"))
    engine.adapters.register(AdapterManifest(name="missing", source="hub", uri="acme/absent", revision="v1"))
    outs = engine.generate([PROMPTS[0], PROMPTS[0]], GREEDY, ["from-hub", "missing"])
    assert outs[0]["token_ids"] == reference_tokens(tiny_models, tiny_adapters)
    assert outs[1]["finish_reason"] == "abort" and "Hugging Face Hub" in outs[1]["error"]


@pytest.fixture
def s3_server(monkeypatch):
    with local_s3() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        yield env["AWS_ENDPOINT_URL"]


def test_s3_source_with_digest_check(tiny_models, tiny_adapters, tmp_path, s3_server):
    import boto3

    from loraplex.engine.core.adapters.sources import file_sha256

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="adapters")
    for f in FILES:
        s3.upload_file(str(tiny_adapters["llama"] / "qv-r4" / f), "adapters", f"tenants/acme/{f}")
    digest = file_sha256(tiny_adapters["llama"] / "qv-r4" / "adapter_model.safetensors")

    engine = make_engine(tiny_models["llama"], adapter_cache_dir=str(tmp_path / "cache"))
    engine.adapters.register(AdapterManifest(name="from-s3", source="s3", uri="s3://adapters/tenants/acme", sha256=digest))
    engine.adapters.register(AdapterManifest(name="bad-digest", source="s3", uri="s3://adapters/tenants/acme", sha256="1" * 64))
    engine.adapters.register(AdapterManifest(name="absent", source="s3", uri="s3://adapters/nobody"))
    outs = engine.generate([PROMPTS[0]] * 3, GREEDY, ["from-s3", "bad-digest", "absent"])
    assert outs[0]["token_ids"] == reference_tokens(tiny_models, tiny_adapters)
    assert "sha256 mismatch" in outs[1]["error"]
    assert "s3://adapters/nobody was not found in S3" in outs[2]["error"]
    assert (tmp_path / "cache" / "s3" / "adapters" / "tenants" / "acme" / "adapter_model.safetensors").is_file()


def test_s3_downloads_stay_within_the_disk_budget(tiny_models, tiny_adapters, tmp_path, s3_server):
    """The disk tier (downloads under --adapter-cache-dir) evicts the least recently used
    download past its byte budget; a cached download is never fetched again."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="adapters")
    names = ["qv-r4", "patterns-r8"]
    for name in names:
        for f in FILES:
            s3.upload_file(str(tiny_adapters["llama"] / name / f), "adapters", f"lib/{name}/{f}")
    one = sum((tiny_adapters["llama"] / "patterns-r8" / f).stat().st_size for f in FILES)
    engine = make_engine(tiny_models["llama"], adapter_cache_dir=str(tmp_path / "cache"), adapter_disk_bytes=one + 1,
                         max_active_adapters=2, max_cpu_adapters=1)
    for name in names:
        engine.adapters.register(AdapterManifest(name=name, source="s3", uri=f"s3://adapters/lib/{name}"))
    first = engine.generate([PROMPTS[0]], GREEDY, ["qv-r4"])[0]["token_ids"]
    engine.generate([PROMPTS[0]], GREEDY, ["patterns-r8"])
    disk = engine.adapters.disk
    cached = {p.name for p in disk.lru}
    assert cached == {"patterns-r8"} and disk.bytes <= one + 1 and disk.evictions == 1, (cached, disk.bytes)
    # qv-r4 again: its download was evicted, so it is fetched again (the other one goes)
    engine.adapters.unregister("qv-r4")
    engine.adapters.register(AdapterManifest(name="qv-r4", source="s3", uri="s3://adapters/lib/qv-r4"))
    assert engine.generate([PROMPTS[0]], GREEDY, ["qv-r4"])[0]["token_ids"] == first
    assert {p.name for p in disk.lru} == {"qv-r4"}
