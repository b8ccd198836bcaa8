"""Each model family with quirks, served over HTTP, against transformers (+ PEFT): Qwen3 (q/k
norm), Gemma 2 (soft-capping, sliding/full layers, (1 + w) norms, sandwich norms, embedding
scale, query_pre_attn_scalar), Gemma 3 (the same plus q/k norm and per-layer-type RoPE) and
Phi-3 (fused qkv_proj / gate_up_proj weights and a PEFT adapter on the fused names, LongRoPE,
a window on every layer), Mixtral (sparse MoE MLP, LoRA on attention), and a block-wise fp8
Llama (HF `quant_method: fp8`) against transformers on its dequantized weights, with the
memory figure of /info. Tiny random checkpoints
from bench/tiny.py.

For the base and for an adapter, through LoRAX's /generate (token ids and logprobs): greedy
tokens equal transformers' / PeftModel's token for token (past the 8-token windows; Phi-3's
sequences stay within its 128-position training length: past it transformers recomputes the
whole sequence with the long factors, which the engine does not, see docs/engine.md), and every
prompt position's logprob within 1e-4 of the reference's log-softmax (fp32 on the CPU; observed
differences are ~1e-5 or less). tests/engine/core/test_families.py checks the long factors.
"""
from __future__ import annotations

import httpx
import pytest
import torch

from tests.engine.api.conftest import EngineProcess
from tests.engine.core.conftest import PROMPTS
from bench.tiny import ALL_MODULES, NEW_FAMILIES, make_tiny_adapter, make_tiny_fp8_checkpoint

pytestmark = pytest.mark.slow  # six engine processes

LOGPROB_ATOL = 1e-4
MAX_NEW = 24
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # Phi-3's fused names
           "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # LoRA on attention, the experts as they are


FP8 = "llama-fp8"  # a block-wise fp8 Llama, against transformers on its dequantized weights
SERVED = (*NEW_FAMILIES, FP8)


@pytest.fixture(scope="module")
def family_servers(tiny_models, tmp_path_factory):
    """One engine per family (and one fp8 base) with its adapter `lora` preloaded, started
    together. Yields {name: (server, reference checkpoint dir)}."""
    root = tmp_path_factory.mktemp("families")
    servers, references = {}, {}
    try:
        for name in SERVED:
            model_dir = references[name] = tiny_models.get(name)
            if name == FP8:  # the adapter is trained against the full base; it applies to the fp8 one
                model_dir = str(make_tiny_fp8_checkpoint(tiny_models["llama"], root / "fp8", root / "fp8-dequantized"))
                references[name] = str(root / "fp8-dequantized")
            adapters = root / name
            make_tiny_adapter(references[name], adapters / "lora", rank=8, alpha=16, seed=7,
                              target_modules=TARGETS.get(name, ALL_MODULES))
            servers[name] = EngineProcess(name, [
                "--model-id", model_dir, "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "128",
                "--block-size", "4", "--adapter-dir", str(adapters), "--preload-adapters", "lora"],
                root / f"{name}.log")
        for server in servers.values():
            server.wait_ready()
        yield {name: (server, references[name]) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()


def reference(model_dir: str, adapter_dir=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(model, adapter_dir).eval() if adapter_dir else model


@pytest.mark.parametrize("family", SERVED)
def test_family_matches_transformers_and_peft_over_http(family, family_servers):
    server, reference_dir = family_servers[family]
    info = httpx.get(server.url + "/info").json()
    assert info["architecture"] == {"qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                                    "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                                    "mixtral": "MixtralForCausalLM", FP8: "LlamaForCausalLM"}[family]
    if family == FP8:  # the seven projections at 1 byte a weight instead of 4 (fp32 on the CPU)
        assert info["quantization"] == "fp8" and info["weight_bytes"] < 0.6 * info["weight_bytes_unquantized"]
    else:
        assert info["quantization"] is None and info["weight_bytes"] == info["weight_bytes_unquantized"]
    adapter_dir = server.log_path.parent / family / "lora"
    outputs = {}
    for adapter in (None, "lora"):
        ref = reference(reference_dir, adapter_dir if adapter else None)
        for prompt in (PROMPTS[1], PROMPTS[2]):
            params = {"max_new_tokens": MAX_NEW, "details": True, "decoder_input_details": True, "ignore_eos_token": True}
            if adapter:
                params["adapter_id"] = adapter
            r = httpx.post(server.url + "/generate", json={"inputs": prompt, "parameters": params}, timeout=120)
            assert r.status_code == 200, r.text
            details = r.json()["details"]
            ids = [t["id"] for t in details["prefill"]]
            with torch.no_grad():
                want = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
                logprobs = ref(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            got = [t["id"] for t in details["tokens"]]
            assert got == want, (adapter, prompt)
            expected = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            served = torch.tensor([t["logprob"] for t in details["prefill"][1:]])
            assert (served - expected).abs().max().item() <= LOGPROB_ATOL, (adapter, prompt)
            outputs[(adapter, prompt)] = served
    # the adapter changes the logits, so its rows prove the LoRA path, not the base again
    assert all((outputs[("lora", p)] - outputs[(None, p)]).abs().max() > 1e-2 for p in (PROMPTS[1], PROMPTS[2]))
