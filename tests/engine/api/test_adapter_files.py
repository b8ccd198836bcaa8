"""One tenant's adapter files must never hurt another (issue 20), through HTTP against a real
`loraplex-engine` with a local S3 (moto):

- a regular expression in adapter_config.json's rank_pattern/alpha_pattern fails that adapter at
  once, and a base-model request sent meanwhile is not stalled (PEFT's `re` held the GIL);
- a lora_alpha that is NaN, infinite or absurd, or weights that overflow once scaled, fail the
  adapter instead of serving garbage;
- `config_sha256` pins adapter_config.json as `sha256` pins the weights: a config changed after
  review fails the load;
- S3 uris whose key walks up (`..`, `.`, empty segments, `%2e%2e`, backslashes) are refused at
  registration, and the disk tier's eviction leaves a file outside --adapter-cache-dir alone.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine.api.conftest import assert_error, engine_process
from tests.support.s3 import local_s3

FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def s3_env():
    with local_s3() as env:
        yield env


@pytest.fixture(scope="module")
def files(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-files")
    (root / "adapters").mkdir()
    (root / "cache").mkdir()
    return root


@pytest.fixture(scope="module")
def engine(assets, files, s3_env):
    one = sum((assets.adapter_dir / "a1" / f).stat().st_size for f in FILES)
    # room for one S3 download: the next one evicts the least recently used
    args = ["--model-id", str(assets.base), "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "64",
            "--adapter-dir", str(files / "adapters"), "--adapter-cache-dir", str(files / "cache"),
            "--adapter-disk-bytes", str(one + one // 2)]
    with engine_process("adapter-files", args, files / "engine.log", env={**s3_env, "OMP_NUM_THREADS": "1"}) as proc:
        yield proc


def put(engine, name: str, manifest: dict) -> httpx.Response:
    return httpx.put(f"{engine.url}/v1/adapters/{name}", json=manifest, timeout=30)


def complete(engine, model: str, timeout: float = 120, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(engine.url + "/v1/completions", timeout=timeout, json={
        "model": model, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})


def local_copy(assets, files, name: str, **config_changes) -> dict:
    dst = files / "adapters" / name
    shutil.copytree(assets.adapter_dir / "a1", dst)
    if config_changes:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config_changes)
        # json.dumps writes NaN / Infinity as Python's json reads them (PEFT's own files do too)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return {"source": "local", "uri": name}


def test_a_regex_pattern_fails_its_adapter_and_stalls_nobody(engine, assets, files):
    """`l([\\w.]+)+X` against "model.layers.0.self_attn.q_proj": 2.2 s of backtracking per key
    and module in `re` (measured on this machine), each holding the GIL throughout: before, the
    base request below took 39 s, and the adapter then loaded "successfully"."""
    evil = {rf"l([\w.]+)+{end}": 4 for end in "XYZ"}
    manifest = local_copy(assets, files, "regex", rank_pattern=evil, alpha_pattern=evil)
    assert put(engine, "regex", manifest).status_code == 200
    base_seconds = []

    def base_request():
        time.sleep(0.3)  # while the adapter loads
        start = time.monotonic()
        assert complete(engine, "base", timeout=300, max_tokens=16).status_code == 200
        base_seconds.append(time.monotonic() - start)

    other = threading.Thread(target=base_request)
    other.start()
    got = complete(engine, "regex", timeout=300)
    other.join()
    print(f"base request: {base_seconds[0]:.2f} s")
    err = assert_error(got, 424, "adapter_failed")
    assert "rank_pattern key" in err["message"] and "regular expressions are refused" in err["message"], err
    state = httpx.get(f"{engine.url}/v1/adapters/regex").json()
    assert state["state"] == "failed" and "rank_pattern key" in state["message"]
    assert base_seconds[0] < 5, base_seconds  # 0.11 s unstalled (measured); 39 s before the fix


@pytest.mark.parametrize("alpha, raw", [
    ("nan", "NaN"), ("inf", "1e309"), ("huge", "1e39"), ("negative", "-16"), ("zero", "0"),
])
def test_a_bad_lora_alpha_fails_the_adapter(engine, assets, files, alpha, raw):
    name = f"alpha-{alpha}"
    manifest = local_copy(assets, files, name)
    path = files / "adapters" / name / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["lora_alpha"] = "@"
    path.write_text(json.dumps(cfg).replace('"@"', raw))  # the number as written, not as Python re-prints it
    assert put(engine, name, manifest).status_code == 200
    err = assert_error(complete(engine, name), 424, "adapter_failed")
    assert "lora_alpha must be a finite number" in err["message"], err
    assert httpx.get(f"{engine.url}/v1/adapters/{name}").json()["state"] == "failed"


def test_weights_that_overflow_once_scaled_fail_the_adapter(engine, assets, files):
    """Finite in the file (1e38), infinite once multiplied by alpha / r = 4 in float32."""
    manifest = local_copy(assets, files, "overflow")
    path = files / "adapters" / "overflow" / "adapter_model.safetensors"
    weights = load_file(str(path))
    weights = {k: torch.full_like(v, 1e38) if "lora_B" in k else v for k, v in weights.items()}
    save_file(weights, str(path))
    assert put(engine, "overflow", manifest).status_code == 200
    err = assert_error(complete(engine, "overflow"), 424, "adapter_failed")
    assert "NaN or infinity once scaled" in err["message"], err


def test_config_sha256_pins_adapter_config(engine, assets, files):
    manifest = local_copy(assets, files, "pinned")
    folder = files / "adapters" / "pinned"
    pins = {"sha256": hashlib.sha256((folder / FILES[1]).read_bytes()).hexdigest(),
            "config_sha256": hashlib.sha256((folder / FILES[0]).read_bytes()).hexdigest()}
    r = put(engine, "pinned", {**manifest, **pins})
    assert r.status_code == 200, r.text
    assert complete(engine, "pinned").status_code == 200

    # The same reviewed digests, but the config was changed afterwards (lora_alpha 16 -> 64).
    changed = local_copy(assets, files, "pinned-changed", lora_alpha=64)
    assert put(engine, "pinned-changed", {**changed, **pins}).status_code == 200
    err = assert_error(complete(engine, "pinned-changed"), 424, "adapter_failed")
    assert "sha256 mismatch for adapter_config.json" in err["message"], err
    err = assert_error(put(engine, "bad-pin", {**manifest, "config_sha256": "xyz"}), 400, "invalid_manifest")
    assert "config_sha256" in err["message"]


def test_s3_uris_that_walk_up_are_refused_and_nothing_outside_the_cache_is_touched(engine, assets, files, s3_env,
                                                                                  monkeypatch):
    import boto3

    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    outside = files / "x"  # beside --adapter-cache-dir: cache/s3/adapters/../../../x
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="adapters")
    for f in FILES:
        s3.upload_file(str(assets.adapter_dir / "a1" / f), "adapters", f"../../../x/{f}")
        for good in ("good-1", "good-2"):
            s3.upload_file(str(assets.adapter_dir / "a1" / f), "adapters", f"lib/{good}/{f}")

    bad_uris = ["s3://adapters/../../../x", "s3://adapters/lib/./../../../../x", "s3://adapters//x",
                "s3://adapters/%2e%2e/%2e%2e/%2e%2e/x", "s3://adapters/lib\\..\\..\\x", "s3://adapters/lib/\x00"]
    answers = [put(engine, f"evil-{i}", {"source": "s3", "uri": uri}) for i, uri in enumerate(bad_uris)]
    evil = [complete(engine, f"evil-{i}") for i in range(len(bad_uris))]
    # Two more S3 adapters: past the disk budget, the older downloads are evicted (rmtree).
    for good in ("good-1", "good-2"):
        assert put(engine, good, {"source": "s3", "uri": f"s3://adapters/lib/{good}"}).status_code == 200
        assert complete(engine, good).status_code == 200
    assert (outside / "keep.txt").is_file(), "the disk tier's eviction deleted a folder outside the cache"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"], "files were written outside the cache"
    for uri, answer in zip(bad_uris, answers):
        err = assert_error(answer, 400, "invalid_manifest")
        assert "is refused" in err["message"], (uri, err)
    for answer in evil:
        assert_error(answer, 404, "model_not_found")
    assert not (files / "cache" / "s3" / "adapters" / "lib" / "good-1").exists()  # evicted, inside the cache
