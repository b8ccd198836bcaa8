"""A block-wise fp8 base (HF `quant_method: fp8`): the engine keeps the weights in fp8 and
dequantizes them for each matmul. Prompt logits equal transformers' on the dequantized weights
(within 1e-4, fp32 on the CPU), with and without an adapter; malformed fp8 checkpoints are
refused by name. Over HTTP (with the memory figure of /info): tests/engine/api/test_families_http.py."""
import json
import time

import pytest
import torch

from loraplex.engine.model.config import UnsupportedModelError
from loraplex.kernels.fp8_ref import dequantize_fp8_blockwise_ref, quantize_fp8_blockwise_ref
from loraplex.manifest import AdapterManifest
from tests.engine.core.conftest import PROMPTS, make_engine, prefill_in_one_forward
from bench.tiny import make_tiny_adapter, make_tiny_fp8_checkpoint

LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def fp8_dirs(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    make_tiny_fp8_checkpoint(tiny_models["qwen2"], root / "fp8", root / "ref", block=(32, 16))
    make_tiny_adapter(root / "ref", root / "adapters" / "lora", target_modules=["q_proj", "v_proj", "down_proj"], seed=5)
    return root


def test_block_quantization_round_trips_within_fp8_precision():
    w = torch.randn(70, 40, generator=torch.Generator().manual_seed(0))  # partial edge blocks
    q, scale_inv = quantize_fp8_blockwise_ref(w, (32, 16))
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 3)
    back = dequantize_fp8_blockwise_ref(q, scale_inv, (32, 16), torch.float32)
    # e4m3: rounding to 3 mantissa bits (2^-4 relative), or to the subnormal step 2^-9 of the scale
    scale = scale_inv.repeat_interleave(32, 0)[:70].repeat_interleave(16, 1)[:, :40]
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + scale * 2 ** -10 + 1e-7).all()


def test_fp8_base_with_and_without_adapter_matches_the_dequantized_reference(fp8_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = make_engine(str(fp8_dirs / "fp8"), adapter_dir=str(fp8_dirs / "adapters"))
    engine.adapters.register(AdapterManifest(name="lora", uri=str(fp8_dirs / "adapters" / "lora")))
    engine.adapters.request_load("lora")
    model = engine.runner.model
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.parametrizations.weight.original.dtype == torch.float8_e4m3fn  # kept quantized
    assert model.weight_bytes < model.weight_bytes_unquantized
    deadline = time.monotonic() + 30
    while engine.adapters.get("lora")["state"] != "host" and time.monotonic() < deadline:
        time.sleep(0.01)
    seqs, _, logits = prefill_in_one_forward(engine, [(PROMPTS[1], None), (PROMPTS[2], "lora"), (PROMPTS[0], None)])
    base = AutoModelForCausalLM.from_pretrained(fp8_dirs / "ref", dtype=torch.float32).eval()
    with_lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fp8_dirs / "ref", dtype=torch.float32),
                                          fp8_dirs / "adapters" / "lora").eval()
    for seq, got in zip(seqs, logits):
        with torch.no_grad():
            ref = (with_lora if seq.adapter else base)(input_ids=torch.tensor([seq.prompt_ids])).logits[0]
        assert (got - ref).abs().max().item() <= LOGIT_ATOL, seq.adapter


def test_malformed_fp8_checkpoints_are_refused_by_name(fp8_dirs, tmp_path):
    import shutil

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(fp8_dirs / "fp8", d)
        cfg = json.loads((d / "config.json").read_text())
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    cases = {
        "gptq": (lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}), "unsupported quantization 'gptq'"),
        "per-tensor": (lambda c: c["quantization_config"].pop("weight_block_size"), "weight_block_size"),
        "no-config": (lambda c: c.pop("quantization_config"), "is fp8, but config.json has no fp8 quantization_config"),
        "wrong-block": (lambda c: c["quantization_config"].update(weight_block_size=[16, 16]), "weight_scale_inv has shape"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(UnsupportedModelError, match=message):
            make_engine(variant(name, edit))
