"""Sampling: per-row settings in one batch, seeded reproducibility, stop conditions."""
import torch

from loraplex.engine.core.sampler import apply_repetition_penalty, top_k_top_p_mask
from loraplex.engine.core.sampling_params import SamplingParams
from tests.engine.core.conftest import PROMPTS, make_engine


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny_models):
    engine = make_engine(tiny_models["llama"])
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], p)[0]["token_ids"]
    noisy = [SamplingParams(max_tokens=16, temperature=1.3, ignore_eos=True) for _ in PROMPTS[1:]]
    in_batch = engine.generate([PROMPTS[0], *PROMPTS[1:]], [p, *noisy])[0]["token_ids"]
    assert alone == in_batch
    other_seed = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))
    assert other_seed[0]["token_ids"] != alone


def test_top_k_top_p_mask_against_a_plain_reference():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    top_k = torch.tensor([0, 1, 5, 0, 10, 3])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.8, 0.01])
    masked = top_k_top_p_mask(logits.clone(), top_k, top_p)
    for i in range(6):
        order = logits[i].argsort(descending=True)
        keep = order[: top_k[i]] if top_k[i] > 0 else order
        probs = logits[i, keep].softmax(-1)
        kept = []
        mass = 0.0
        for tok, pr in zip(keep.tolist(), probs.tolist()):
            if mass >= top_p[i] and kept:
                break
            kept.append(tok)
            mass += pr
        assert set(torch.isfinite(masked[i]).nonzero().flatten().tolist()) == set(kept)


def test_repetition_penalty_matches_transformers(tiny_models):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    engine = make_engine(tiny_models["llama"])
    s = engine.make_sequence("r", PROMPTS[1], SamplingParams(repetition_penalty=1.3))
    logits = torch.randn(1, engine.model_config.vocab_size)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([s.token_ids()]), logits.clone())
    apply_repetition_penalty(logits, [s])
    assert torch.allclose(logits, ref)


def test_greedy_rows_and_sampled_rows_share_a_batch(tiny_models):
    engine = make_engine(tiny_models["qwen2"])
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = engine.generate([PROMPTS[3]], greedy)[0]["token_ids"]
    mixed = engine.generate([PROMPTS[3], PROMPTS[0]], [greedy, SamplingParams(max_tokens=10, temperature=2.0, ignore_eos=True)])
    assert mixed[0]["token_ids"] == alone


def test_stop_conditions(tiny_models):
    engine = make_engine(tiny_models["llama"])
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = engine.generate([PROMPTS[0]], greedy)[0]
    text, ids = full["text"], full["token_ids"]
    # a stop string taken from the middle of the greedy text truncates there
    stop = text[6:9]
    assert stop and text.find(stop) >= 0
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out["finish_reason"] == "stop" and out["text"] == text[: text.find(stop)]
    kept = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                                                        include_stop_str_in_output=True))[0]
    assert kept["text"] == text[: text.find(stop) + len(stop)]
    # a stop token id ends generation on that token
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[ids[4]]))[0]
    assert out["finish_reason"] == "stop" and out["token_ids"] == ids[: ids.index(ids[4]) + 1]
    # EOS (unless ignored) ends with "stop"
    engine.eos_token_ids = (ids[2],)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0))[0]
    assert out["finish_reason"] == "stop" and out["token_ids"][-1] == ids[2]
    # max tokens: "length"
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 3


def test_logprobs_are_log_softmax_of_the_logits(tiny_models):
    engine = make_engine(tiny_models["llama"])
    out = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(out["logprobs"]) == 4
    for lp, tok in zip(out["logprobs"], out["token_ids"]):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token
        assert abs(lp.top[0][1] - lp.logprob) < 1e-6 and lp.logprob <= 0


def test_vectorized_penalty_and_logprobs_per_row_in_one_batch(tiny_models):
    """Rows with different repetition penalties (1.0 = off) and different logprob counts in one
    batch: each row equals transformers' processor on that row alone, and each row gets its own k."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from loraplex.engine.core.sampler import sample

    engine = make_engine(tiny_models["llama"])
    penalties, ks = [1.3, 1.0, 0.7, 2.0], [None, 0, 2, 5]
    seqs = [engine.make_sequence(f"v{i}", PROMPTS[i], SamplingParams(repetition_penalty=p, temperature=0, logprobs=k))
            for i, (p, k) in enumerate(zip(penalties, ks))]
    logits = torch.randn(4, engine.model_config.vocab_size, generator=torch.Generator().manual_seed(3))
    want = torch.stack([RepetitionPenaltyLogitsProcessor(p)(torch.tensor([s.token_ids()]), logits[i:i + 1].clone())[0]
                        for i, (p, s) in enumerate(zip(penalties, seqs))])
    got = apply_repetition_penalty(logits.clone(), seqs)
    assert torch.allclose(got, want)
    tokens = sample(logits.clone(), seqs, torch.Generator().manual_seed(0))
    assert tokens == want.argmax(-1).tolist()
    lps = want.log_softmax(-1)
    for i, (seq, k) in enumerate(zip(seqs, ks)):
        if k is None:
            assert not seq.pending_logprobs
            continue
        (lp,) = seq.pending_logprobs
        assert lp.token_id == tokens[i] and abs(lp.logprob - lps[i, tokens[i]].item()) < 1e-5
        assert [t for t, _ in lp.top] == (lps[i].topk(k).indices.tolist() if k else [])
