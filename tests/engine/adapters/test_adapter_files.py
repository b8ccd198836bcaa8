"""What a tenant's adapter files may make the engine do (issue 20): PEFT's pattern keys are
matched as PEFT means them but in linear time, and nothing else is run; alphas and ranks are
checked; every path built from an S3 key or a Hub revision, and every eviction, stays inside
--adapter-cache-dir whatever manifest reached the loader (the schema's checks are bypassed here
with model_construct, so these are the engine's own checks)."""
import json
import os
import shutil
import time

import pytest
from peft.utils.other import get_pattern_key

from loraplex.engine.core.adapters.disk_tier import DiskTier
from loraplex.engine.core.adapters.peft_config import (MAX_PATTERN_KEY_LENGTH, MAX_PATTERN_KEYS, AdapterFormatError,
                                                       check_adapter_config, check_alpha)
from loraplex.engine.core.adapters.sources import AdapterSourceError, fetch_adapter, fetch_hub
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.manifest import AdapterManifest
from tests.engine.adapters.conftest import make_engine
from tests.engine.core.conftest import PROMPTS
from tests.support.s3 import local_s3

FILES = ("adapter_config.json", "adapter_model.safetensors")
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

# Every module name of a 12-layer llama, as PEFT names them (current_key in LoraModel).
MODULES = [f"model.layers.{i}.{p}.{m}" for i in range(12)
           for p, ms in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))) for m in ms]
PEFT_KEYS = [
    "q_proj", "o_proj", "self_attn.q_proj", "mlp.down_proj", "layers.1.self_attn.q_proj",
    "model.layers.0.mlp.down_proj", "^model.layers.0.mlp.down_proj", "^layers.0.mlp.down_proj",
    r"layers\.1\.mlp\.up_proj", "1.1.mlp.up_proj",  # PEFT's '.' is any character: layer 101 would match
    "proj", "_proj", "q_proj$", ".q_proj", "layers.10.self_attn.v_proj", "0.mlp.gate_proj", "attn.q-proj",
]


def test_pattern_keys_resolve_exactly_as_peft_resolves_them():
    """Parity with peft.utils.other.get_pattern_key, one key at a time and first-match-wins."""
    for key in PEFT_KEYS:
        scaling = check_adapter_config({"r": 8, "rank_pattern": {key: 4}})
        for module in MODULES:
            peft = {key: 4}.get(get_pattern_key([key], module), 8)
            assert scaling.rank(module) == peft, (key, module)
    patterns = {k: i + 1 for i, k in enumerate(PEFT_KEYS)}  # several keys: the first match wins
    scaling = check_adapter_config({"r": 99, "lora_alpha": 7, "alpha_pattern": patterns})
    for module in MODULES:
        assert scaling.alphas.value(module) == patterns.get(get_pattern_key(list(patterns), module), 7), module


@pytest.mark.parametrize("key", [
    r"l([\w.]+)+X",  # nested quantifiers: seconds to hours of backtracking under the GIL in `re`
    "(a|aa)+", ".*q_proj", r"layers\.\d+\.self_attn\.q_proj", "(q|v)_proj", "[qv]_proj", "q_proj?",
    "layers.{1}", "a^b", "", "q_proj\n",
])
def test_regular_expression_keys_are_refused_at_once(key):
    start = time.perf_counter()
    for field in ("rank_pattern", "alpha_pattern"):
        with pytest.raises(AdapterFormatError, match=f"{field} key .* is not a module name"):
            check_adapter_config({field: {key: 4}})
    assert time.perf_counter() - start < 0.5


def test_pattern_caps():
    with pytest.raises(AdapterFormatError, match=f"at most {MAX_PATTERN_KEYS}"):
        check_adapter_config({"rank_pattern": {f"layers.{i}.q_proj": 4 for i in range(MAX_PATTERN_KEYS + 1)}})
    with pytest.raises(AdapterFormatError, match="not a module name"):
        check_adapter_config({"rank_pattern": {"a" * (MAX_PATTERN_KEY_LENGTH + 1): 4}})
    with pytest.raises(AdapterFormatError, match="must be a JSON object"):
        check_adapter_config({"alpha_pattern": ["q_proj"]})
    # The biggest allowed table resolves every module of a 126-layer model quickly (no key matches:
    # the worst case, every key is tried for every module).
    keys = {f"model.layers.{i}.mlp.nope_{i}": 4 for i in range(MAX_PATTERN_KEYS)}
    scaling = check_adapter_config({"r": 8, "rank_pattern": keys})
    start = time.perf_counter()
    assert all(scaling.rank(f"model.layers.{i}.self_attn.q_proj") == 8 for i in range(126 * 7))
    print(f"4096 keys x 882 modules: {time.perf_counter() - start:.2f} s")


@pytest.mark.parametrize("cfg, fragment", [
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": 1e39}, "lora_alpha must be a finite number"),
    ({"lora_alpha": 0}, "lora_alpha must be a finite number"),
    ({"lora_alpha": -16}, "lora_alpha must be a finite number"),
    ({"lora_alpha": "16"}, "lora_alpha must be a finite number"),
    ({"lora_alpha": True}, "lora_alpha must be a finite number"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern['q_proj'] must be a finite number"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 4.5}, "r must be a positive integer"),
    ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern['q_proj'] must be a positive integer"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false"),
])
def test_bad_numbers_are_refused(cfg, fragment):
    with pytest.raises(AdapterFormatError) as e:
        check_adapter_config(cfg)
    assert fragment in str(e.value)


def test_alpha_bounds():
    assert check_alpha("a", 1e6) == 1e6 and check_alpha("a", 0.5) == 0.5


@pytest.fixture
def s3(monkeypatch):
    import boto3

    with local_s3() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket="adapters")
        yield client


def test_s3_keys_that_walk_up_never_leave_the_cache(tiny_models, tiny_adapters, tmp_path, s3):
    """A manifest that reached the loader without the schema's check (model_construct): the
    download folder is checked after resolution before anything is written, so the files land
    nowhere and a file already there survives."""
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    for f in FILES:
        s3.upload_file(str(tiny_adapters["llama"] / "qv-r4" / f), "adapters", f"../../../x/{f}")
    engine = make_engine(tiny_models["llama"], adapter_cache_dir=str(tmp_path / "cache"))
    evil = AdapterManifest.model_construct(name="evil", source="s3", uri="s3://adapters/../../../x", revision=None,
                                           sha256=None, config_sha256=None, preload=False, tenants=[])
    engine.adapters.register(evil)
    out = engine.generate([PROMPTS[0]], GREEDY, ["evil"])[0]
    assert out["finish_reason"] == "abort" and "leads outside" in out["error"], out
    assert sorted(os.listdir(outside)) == ["keep.txt"] and (outside / "keep.txt").read_text() == "precious"
    with pytest.raises(AdapterSourceError, match="leads outside"):
        fetch_adapter(evil, None, tmp_path / "cache")


def test_a_hub_snapshot_outside_its_repo_folder_is_refused(tiny_adapters, tmp_path, monkeypatch):
    """huggingface_hub joins a revision (and the commit hash a refs/ file holds) under the repo's
    folder: whatever folder it answers, the engine reads only inside that repo's folder."""
    import huggingface_hub

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_adapters["llama"] / "qv-r4", elsewhere)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(elsewhere))
    with pytest.raises(AdapterSourceError, match="leads outside"):
        fetch_hub("acme/lora", "../../../elsewhere", tmp_path / "hub")
    link = tmp_path / "hub" / "models--acme--lora" / "snapshots" / "c0ffee"
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere, target_is_directory=True)  # a snapshot that is a link out
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(link))
    with pytest.raises(AdapterSourceError, match="leads outside"):
        fetch_hub("acme/lora", "main", tmp_path / "hub")


def test_the_disk_tier_never_deletes_outside_its_root(tmp_path):
    cache = tmp_path / "cache"
    (cache / "s3" / "b" / "inside").mkdir(parents=True)
    (cache / "s3" / "b" / "inside" / "adapter_config.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x" * 100)
    disk = DiskTier(cache, budget_bytes=0)
    for folder in (cache / "s3" / "b" / ".." / ".." / ".." / "outside", outside, cache):
        disk.open(folder)
        disk.close(folder)  # outside its root: never tracked, so never evicted
    assert (outside / "keep.txt").exists() and cache.is_dir()
    # A tracked folder replaced by a link to elsewhere is forgotten, not followed.
    link = cache / "s3" / "b" / "linked"
    link.mkdir()
    (link / "adapter_config.json").write_text(json.dumps({"r": 8}))
    disk = DiskTier(cache, budget_bytes=10 ** 9)
    assert link in disk.lru
    shutil.rmtree(link)
    link.symlink_to(outside, target_is_directory=True)
    disk.budget_bytes = 0
    disk._evict()
    assert (outside / "keep.txt").exists() and link not in disk.lru


def test_an_s3_prefix_flag_that_walks_up_stops_the_engine_at_start():
    from loraplex.engine.core.adapters.sources import DefaultSource

    assert DefaultSource("s3", None, None, "s3://bucket/lib").s3_prefix == "s3://bucket/lib/"
    with pytest.raises(ValueError, match="--adapter-s3-prefix .* '..' path segment"):
        DefaultSource("s3", None, None, "s3://bucket/../x/")
