"""Heterogeneous multi-LoRA batches against PEFT: every row matches its own PeftModel.

Tolerance: fp32 on the CPU, max |logit difference| <= 1e-4.
"""
import pytest
import torch

from loraplex.engine.core.sampling_params import SamplingParams
from tests.engine.core.conftest import PROMPTS, prefill_in_one_forward
from tests.engine.adapters.conftest import ADAPTER_SPECS, make_engine, register_all, wait_for

LOGIT_ATOL = 1e-4
# One row per adapter plus base rows in between: the batch mixes ranks 2..16 and no-adapter rows.
ROWS = [(PROMPTS[0], "qv-r4"), (PROMPTS[1], None), (PROMPTS[2], "all-r16-rslora"), (PROMPTS[3], "patterns-r8"),
        (PROMPTS[4], "mlp-layer1-r2"), (PROMPTS[2], None), (PROMPTS[1], "qv-r4")]


def loaded_engine(tiny_models, tiny_adapters, family, **overrides):
    engine = make_engine(tiny_models[family], adapter_dir=str(tiny_adapters[family]), **overrides)
    register_all(engine, tiny_adapters[family])
    for name in ADAPTER_SPECS:
        engine.adapters.request_load(name)
    wait_for(lambda: all(a["state"] == "host" for a in engine.adapters.list()))
    return engine


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mixed_adapter_batch_logits_match_peft(family, tiny_models, tiny_adapters, peft_models):
    engine = loaded_engine(tiny_models, tiny_adapters, family)
    seqs, lora, per_seq = prefill_in_one_forward(engine, ROWS)
    assert len(lora.segments) == 4 and sorted({r for *_, r in lora.segments}) == [2, 4, 8, 16]
    for seq, got in zip(seqs, per_seq):
        ref_model = peft_models(family, seq.adapter)
        with torch.no_grad():
            ref = ref_model(input_ids=torch.tensor([seq.prompt_ids])).logits[0]
        assert (got - ref).abs().max().item() <= LOGIT_ATOL, seq.adapter
        if seq.adapter is not None:  # the adapter really changes the output, or this proves nothing
            with torch.no_grad():
                base = peft_models(family, None)(input_ids=torch.tensor([seq.prompt_ids])).logits[0]
            assert (got - base).abs().max().item() > 1e-3, seq.adapter


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mixed_adapter_greedy_generation_matches_peft(family, tiny_models, tiny_adapters, peft_models):
    engine = loaded_engine(tiny_models, tiny_adapters, family, max_active_adapters=3)  # forces slot churn
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = engine.generate([p for p, _ in ROWS], params, [a for _, a in ROWS])
    for (prompt, adapter), out in zip(ROWS, outs):
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = peft_models(family, adapter).generate(input_ids=ids, max_new_tokens=16, do_sample=False,
                                                         eos_token_id=None, pad_token_id=0)
        assert out["token_ids"] == ref[0, ids.shape[1]:].tolist(), adapter
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
