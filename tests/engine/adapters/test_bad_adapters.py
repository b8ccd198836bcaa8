"""Bad adapters fail with a precise message, never take the engine down, and never stall the
requests of other adapters."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from loraplex.engine.core.errors import AdapterUnavailableError, UnknownAdapterError
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.manifest import AdapterManifest
from tests.engine.core.conftest import PROMPTS
from tests.engine.adapters.conftest import make_engine, wait_for
from bench.tiny import make_tiny_adapter, make_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def copy_good(tiny_adapters, root, name):
    dst = root / name
    shutil.copytree(tiny_adapters["llama"] / "qv-r4", dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def bad_adapters(tiny_models, tiny_adapters, tmp_path_factory):
    """{name: (folder or uri, expected message fragment)} inside one adapter root."""
    root = tmp_path_factory.mktemp("bad-adapters")
    cases = {}

    p = copy_good(tiny_adapters, root, "corrupt")
    (p / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    cases["corrupt"] = (str(p), "unreadable")

    p = copy_good(tiny_adapters, root, "no-weights")
    (p / "adapter_model.safetensors").unlink()
    cases["no-weights"] = (str(p), "missing adapter_model.safetensors")

    p = copy_good(tiny_adapters, root, "no-config")
    (p / "adapter_config.json").unlink()
    cases["no-config"] = (str(p), "missing adapter_config.json")

    p = copy_good(tiny_adapters, root, "dora")
    edit_config(p, use_dora=True)
    cases["dora"] = (str(p), "DoRA")

    p = copy_good(tiny_adapters, root, "modules-to-save")
    edit_config(p, modules_to_save=["lm_head"])
    cases["modules-to-save"] = (str(p), "modules_to_save")

    p = copy_good(tiny_adapters, root, "lm-head")
    w = load_file(str(p / "adapter_model.safetensors"))
    w["base_model.model.lm_head.lora_A.weight"] = w[next(iter(w))].clone()
    save_file(w, str(p / "adapter_model.safetensors"))
    cases["lm-head"] = (str(p), "lm_head")

    p = copy_good(tiny_adapters, root, "pickle-bin")
    (p / "adapter_model.safetensors").rename(p / "adapter_model.bin")
    cases["pickle-bin"] = (str(p), "pickle")

    # an adapter trained for a wider base
    wide = make_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "base", "llama", hidden_size=96)
    make_tiny_adapter(wide, root / "wrong-base", rank=4)
    cases["wrong-base"] = (str(root / "wrong-base"), "another base")

    make_tiny_adapter(tiny_models["llama"], root / "rank-too-big", rank=32, alpha=32)
    cases["rank-too-big"] = (str(root / "rank-too-big"), "exceeds --max-lora-rank 16")

    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(tiny_adapters["llama"] / "qv-r4", outside / "real")
    os.symlink(outside / "real", root / "escape-symlink")
    cases["escape-symlink"] = (str(root / "escape-symlink"), "outside the allowed")
    p = copy_good(tiny_adapters, root, "escape-file-link")
    (p / "adapter_model.safetensors").unlink()
    os.symlink(outside / "real" / "adapter_model.safetensors", p / "adapter_model.safetensors")
    cases["escape-file-link"] = (str(p), "links outside")

    p = copy_good(tiny_adapters, root, "digest-mismatch")
    cases["digest-mismatch"] = (str(p), "sha256 mismatch")
    return root, cases


def test_each_bad_adapter_fails_clearly_while_good_requests_flow(tiny_models, tiny_adapters, bad_adapters):
    root, cases = bad_adapters
    engine = make_engine(tiny_models["llama"], adapter_dir=str(root))
    shutil.copytree(tiny_adapters["llama"] / "all-r16-rslora", root / "good", dirs_exist_ok=True)
    engine.adapters.register(AdapterManifest(name="good", uri=str(root / "good")))
    expected = engine.generate([PROMPTS[0]], GREEDY, ["good"])[0]["token_ids"]

    for name, (uri, _) in cases.items():
        sha = "0" * 64 if name == "digest-mismatch" else None
        engine.adapters.register(AdapterManifest(name=name, uri=uri, sha256=sha))
    # every bad adapter is requested alongside a good request in the same engine steps
    names = list(cases)
    outs = engine.generate([PROMPTS[0]] * (len(names) + 2), GREEDY, ["good", *names, "good"])
    assert outs[0]["token_ids"] == expected and outs[-1]["token_ids"] == expected
    for name, out in zip(names, outs[1:-1]):
        fragment = cases[name][1]
        assert out["finish_reason"] == "abort" and fragment in out["error"], (name, out["error"])
        state = engine.adapters.get(name)
        assert state["state"] == "failed" and fragment in state["message"], (name, state)
        # later requests are refused up front, with the same reason
        with pytest.raises(AdapterUnavailableError, match="failed to load"):
            engine.make_sequence("again", PROMPTS[0], GREEDY, name)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_a_fixed_adapter_can_be_retried_by_registering_again(tiny_models, tiny_adapters, tmp_path):
    p = tmp_path / "flaky"
    shutil.copytree(tiny_adapters["llama"] / "qv-r4", p)
    good_bytes = (p / "adapter_model.safetensors").read_bytes()
    (p / "adapter_model.safetensors").write_bytes(b"garbage")
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tmp_path))
    manifest = AdapterManifest(name="flaky", uri=str(p))
    engine.adapters.register(manifest)
    engine.adapters.request_load("flaky")
    wait_for(lambda: engine.adapters.get("flaky")["state"] == "failed")
    (p / "adapter_model.safetensors").write_bytes(good_bytes)
    assert engine.adapters.register(manifest)["state"] == "registered"  # same manifest: retried
    out = engine.generate([PROMPTS[0]], GREEDY, ["flaky"])[0]
    assert out["finish_reason"] == "length" and engine.adapters.get("flaky")["state"] == "device"


def test_unknown_adapter_and_disabled_local_source(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["llama"])  # no --adapter-dir: local adapters are refused
    with pytest.raises(UnknownAdapterError):
        engine.make_sequence("x", PROMPTS[0], GREEDY, "nope")
    engine.adapters.register(AdapterManifest(name="local", uri=str(tiny_adapters["llama"] / "qv-r4")))
    out = engine.generate([PROMPTS[0]], GREEDY, ["local"])[0]
    assert out["finish_reason"] == "abort" and "--adapter-dir" in out["error"]


@pytest.mark.parametrize("fields,fragment", [
    (dict(name="Bad_Name", uri="/x"), "DNS-1123"),
    (dict(name="a", source="s3", uri="/not/s3"), "s3://"),
    (dict(name="a", source="hub", uri="not a repo!"), "repo id"),
    (dict(name="a", uri="/x", revision="main"), "revision applies only"),
    (dict(name="a", uri="/x", sha256="xyz"), "sha256"),
    (dict(name="a", uri="/x", tenants=["raw-key"]), "sha256 hex"),
    (dict(name="a", uri="/x", config_sha256="xyz"), "config_sha256"),
    (dict(name="a", uri="/adapters/../outside"), "'..' path segment"),
])
def test_manifest_validation(fields, fragment):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=fragment):
        AdapterManifest(**fields)
