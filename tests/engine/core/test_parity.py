"""The engine's model against transformers: prompt logits and greedy tokens, batched.

Tolerance: fp32 on the CPU, max |logit difference| <= 1e-4 (observed ~1e-6; the ops are the
same math in a different order).
"""
import pytest
import torch

from loraplex.engine.core.sampling_params import SamplingParams
from tests.engine.core.conftest import FAMILIES, PROMPTS, hf_greedy, make_engine, prefill_in_one_forward

LOGIT_ATOL = 1e-4


def batch_logits(engine, prompts: list[str]) -> list[torch.Tensor]:
    """All-position logits of several prompts prefilled together in one forward pass."""
    return prefill_in_one_forward(engine, [(p, None) for p in prompts])[2]


@pytest.mark.parametrize("family", FAMILIES + ["llama-sharded"])
def test_prompt_logits_match_transformers_in_one_batch(family, tiny_models, hf_models):
    engine = make_engine(tiny_models[family])
    hf = hf_models(family)
    for prompt, logits in zip(PROMPTS, batch_logits(engine, PROMPTS)):
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = hf(ids).logits[0]
        assert logits.shape == ref.shape
        assert (logits - ref).abs().max().item() <= LOGIT_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers_batched(family, tiny_models, hf_models):
    engine = make_engine(tiny_models[family])
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out["token_ids"] == hf_greedy(hf_models(family), engine.tokenizer, prompt, 24)
        assert out["finish_reason"] == "length"


def test_greedy_matches_under_preemption_and_chunked_prefill(tiny_models, hf_models):
    # 16 blocks of 4 tokens cannot hold all five sequences: the scheduler must preempt and
    # recompute; a 16-token budget forces long prompts through chunked prefill.
    engine = make_engine(tiny_models["llama"], num_kv_blocks=16, block_size=4, max_num_batched_tokens=16,
                         max_model_len=64)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    for prompt, out in zip(PROMPTS, outs):
        assert out["token_ids"] == hf_greedy(hf_models("llama"), engine.tokenizer, prompt, 20)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_prompt_logprobs_through_the_engine_api(tiny_models, hf_models):
    engine = make_engine(tiny_models["qwen2"], max_num_batched_tokens=8)  # chunked prompt
    prompt = PROMPTS[2]
    out = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True))[0]
    ids = torch.tensor([engine.tokenizer.encode(prompt)])
    with torch.no_grad():
        ref = hf_models("qwen2")(ids).logits[0].log_softmax(-1)
    expected = ref[:-1].gather(1, ids[0, 1:, None])[:, 0]
    got = out["prompt_logprobs"]
    assert got[0] is None and len(got) == ids.shape[1]
    assert torch.allclose(torch.tensor(got[1:]), expected, atol=LOGIT_ATOL)


def test_prompt_logprobs_are_computed_in_bounded_chunks(tiny_models, hf_models, monkeypatch):
    """Prompt logprobs take full-vocabulary logits for every prompt row: they are computed at
    most PROMPT_LOGPROB_CHUNK_ROWS rows at a time (here 4), whatever the prompt lengths, and
    give what transformers gives and what one unchunked computation gives."""
    from loraplex.engine.core import model_runner

    prompts = PROMPTS[:3]  # 3 sampling rows: within the chunk bound too
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROB_CHUNK_ROWS", 10**6, raising=False)
    whole = [o["prompt_logprobs"] for o in make_engine(tiny_models["llama"]).generate(prompts, params)]

    monkeypatch.setattr(model_runner, "PROMPT_LOGPROB_CHUNK_ROWS", 4, raising=False)
    engine = make_engine(tiny_models["llama"])
    rows_per_call = []
    compute_logits = engine.runner.model.compute_logits

    def spy(hidden):
        rows_per_call.append(hidden.shape[0])
        return compute_logits(hidden)

    monkeypatch.setattr(engine.runner.model, "compute_logits", spy)
    outs = engine.generate(prompts, params)
    lengths = [len(engine.tokenizer.encode(p)) for p in prompts]
    print(f"prompt lengths {lengths}; logits rows per call {rows_per_call}")
    assert max(rows_per_call) <= 4 < max(lengths)
    assert sum(rows_per_call) == sum(n - 1 for n in lengths) + len(prompts)  # every prompt row once, plus sampling
    worst = 0.0
    for prompt, out, ref_whole in zip(prompts, outs, whole):
        got = out["prompt_logprobs"]
        ids = torch.tensor([engine.tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = hf_models("llama")(ids).logits[0].log_softmax(-1)
        assert got[0] is None and ref_whole[0] is None and len(got) == len(ref_whole) == ids.shape[1]
        assert torch.allclose(torch.tensor(got[1:]), ref[:-1].gather(1, ids[0, 1:, None])[:, 0], atol=LOGIT_ATOL)
        worst = max(worst, (torch.tensor(got[1:]) - torch.tensor(ref_whole[1:])).abs().max().item())
    print(f"largest difference chunked vs unchunked: {worst:.1e}")
    assert worst <= 1e-5
