"""Prefix caching: the block manager's ref counts, hash chain and LRU, then the engine with the
cache on against the cache off (greedy tokens equal, logprobs within 1e-4), under chunked
prefill, preemption and aborts, with no leaked block or ref count."""
import pytest

from loraplex.engine.core.block_manager import BlockManager
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.sequence import Sequence
from tests.engine.core.conftest import PROMPTS, make_engine

LOGPROB_ATOL = 1e-4


def seq(rid: str, tokens: list[int], adapter: str | None = None, digest: str | None = None, **params) -> Sequence:
    s = Sequence(rid, tokens, SamplingParams(max_tokens=4, **params), 4096, eos_token_ids=(0,), adapter=adapter)
    s.adapter_digest = digest
    return s


def run_prefill(bm: BlockManager, s: Sequence) -> list[int]:
    """Admit s from its cached prefix, 'compute' the rest of its tokens, cache its full blocks."""
    hits = bm.cached_prefix(s)
    assert bm.can_admit(s, hits, s.num_tokens)
    bm.admit(s, hits)
    bm.grow(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)
    return hits


def test_full_blocks_are_shared_and_ref_counted():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    prefix = list(range(1, 13))  # three full blocks
    a = seq("a", prefix + [50, 51])
    assert run_prefill(bm, a) == []
    b = seq("b", prefix + [60])
    hits = run_prefill(bm, b)
    assert hits == a.block_table[:3] and b.block_table[:3] == hits
    assert b.block_table[3] != a.block_table[3]  # the partial block is private
    assert [bm.ref_counts[x] for x in hits] == [2, 2, 2]
    assert (bm.queries, bm.hits) == (14 + 13, 12)
    bm.free(a)
    assert [bm.ref_counts[x] for x in hits] == [1, 1, 1] and bm.num_free == 16 - 4
    bm.free(b)
    bm.check_invariants()
    assert bm.num_free == 16 and all(r == 0 for r in bm.ref_counts)


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    run_prefill(bm, seq("a", list(range(1, 9))))  # exactly two full blocks, both cached
    again = seq("b", list(range(1, 9)))
    hits = bm.cached_prefix(again)
    assert len(hits) == 1  # block 2 holds the last token: recomputed, so the step has logits
    bm.admit(again, hits)
    assert again.num_computed_tokens == 4


def test_hash_chain_is_per_adapter_and_per_adapter_content():
    bm = BlockManager(num_blocks=32, block_size=4, enable_prefix_caching=True)
    tokens = list(range(1, 18))
    run_prefill(bm, seq("base", tokens))
    run_prefill(bm, seq("a", tokens, adapter="x", digest="d1"))
    assert bm.cached_prefix(seq("other-adapter", tokens, adapter="y", digest="d1")) == []
    assert bm.cached_prefix(seq("x-other-weights", tokens, adapter="x", digest="d2")) == []
    assert len(bm.cached_prefix(seq("x-same-weights", tokens, adapter="x", digest="d1"))) == 4
    assert len(bm.cached_prefix(seq("base-again", tokens))) == 4
    # a different token early in the chain changes every later hash
    assert bm.cached_prefix(seq("diverges", [99] + tokens[1:])) == []


def test_cached_blocks_are_evicted_lru_only_when_plain_free_blocks_run_out():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    old, new = seq("old", list(range(1, 10))), seq("new", list(range(101, 110)))
    run_prefill(bm, old)  # 2 full cached blocks + 1 partial
    run_prefill(bm, new)
    bm.free(old)
    bm.free(new)
    assert len(bm.free_cached) == 4 and len(bm.free_blocks) == 2 and bm.num_free == 6
    filler = seq("filler", [7] * 8)
    bm.grow(filler, 8)  # takes the two never-cached blocks first
    assert bm.evictions == 0 and len(bm.cached_prefix(seq("q", list(range(1, 10))))) == 2
    bm.grow(filler, 12)  # now a cached block must go: the least recently freed, old's tail
    assert bm.evictions == 1
    assert len(bm.cached_prefix(seq("q2", list(range(1, 10))))) == 1
    assert len(bm.cached_prefix(seq("q3", list(range(101, 110))))) == 2
    bm.free(filler)
    bm.check_invariants()


def test_admission_counts_cached_free_hits_against_free_space():
    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=True)
    a = seq("a", list(range(1, 13)))
    run_prefill(bm, a)  # three full blocks, all cached
    bm.free(a)
    filler = seq("filler", [7] * 5)
    bm.grow(filler, 5)  # the two plain free blocks
    assert bm.num_free == 3  # the three cached ones
    b = seq("b", list(range(1, 13)) + [1, 2, 3, 4, 5])  # 17 tokens: 3 hits + 2 new blocks
    hits = bm.cached_prefix(b)
    assert len(hits) == 3
    # 3 blocks count as free, 2 are needed, but taking the hits leaves none to grow into
    assert not bm.can_admit(b, hits, b.num_tokens)
    bm.free(filler)
    assert bm.can_admit(b, hits, b.num_tokens)
    bm.admit(b, hits)
    bm.grow(b, b.num_tokens)
    assert bm.num_free == 0 and bm.evictions == 0
    bm.free(b)
    bm.check_invariants()


def test_disabled_cache_never_hits():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    run_prefill(bm, seq("a", list(range(1, 13))))
    assert bm.cached_prefix(seq("b", list(range(1, 13)))) == [] and not bm.cached
    assert (bm.queries, bm.hits) == (0, 0)


# ---- the engine --------------------------------------------------------------------------------

def shared_prefix_prompts(engine) -> list[list[int]]:
    """Token-id prompts (no BPE merges across the join) sharing one 41-token prefix."""
    prefix = engine.tokenizer.encode(PROMPTS[2])
    return [prefix + engine.tokenizer.encode(p) for p in PROMPTS]


def assert_same_generations(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"]
        for a, b in zip(g["logprobs"], w["logprobs"]):
            assert abs(a.logprob - b.logprob) <= LOGPROB_ATOL


def assert_no_leak(engine) -> None:
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_free == bm.num_blocks and not any(bm.ref_counts)


@pytest.mark.parametrize("pressure", [False, True], ids=["roomy", "preempting"])
def test_outputs_equal_with_the_cache_on_and_off(tiny_models, pressure):
    # Under pressure: 30 blocks of 4 tokens cannot hold the five sequences (~60 tokens each),
    # and a 16-token budget chunks every prefill; sequences that share blocks get preempted.
    kw = dict(num_kv_blocks=30, block_size=4, max_num_batched_tokens=16, max_model_len=96) if pressure else \
        dict(block_size=4, max_model_len=96)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    results = {}
    for on in (True, False):
        engine = make_engine(tiny_models["llama"], enable_prefix_caching=on, **kw)
        prompts = shared_prefix_prompts(engine)
        first = engine.generate(prompts[:1], greedy)  # fills the cache with the prefix
        rest = engine.generate(prompts, greedy)  # five at once: all hit (on), one batch
        results[on] = (first + rest, engine.block_manager.hits, engine.scheduler.num_preemptions)
        assert_no_leak(engine)
    assert_same_generations(results[True][0], results[False][0])
    hits_on, hits_off = results[True][1], results[False][1]
    assert hits_off == 0
    assert hits_on >= 5 * 40  # every request of the second round reused the 10 prefix blocks
    if pressure:
        assert results[True][2] > 0 and results[False][2] > 0


def test_chunked_prefill_starts_after_the_cached_prefix(tiny_models):
    engine = make_engine(tiny_models["qwen2"], block_size=4, max_num_batched_tokens=8, max_model_len=96)
    prompts = shared_prefix_prompts(engine)
    engine.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0))
    chunks = []
    run = engine.runner.run
    engine.runner.run = lambda batch: (chunks.extend((i.seq.num_computed_tokens, i.num_tokens) for i in batch), run(batch))[1]
    engine.generate(prompts[1:2], SamplingParams(max_tokens=1, temperature=0))
    # 41 prefix tokens: 10 full blocks (40 tokens) cached; prefill of 53 tokens resumes at 40
    assert chunks == [(40, 8), (48, 5)]
    assert engine.block_manager.hits == 40


def test_prompt_logprobs_requests_compute_every_position(tiny_models):
    engine = make_engine(tiny_models["qwen2"], block_size=4)
    prompts = shared_prefix_prompts(engine)
    engine.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0))
    hits = engine.block_manager.hits
    off = make_engine(tiny_models["qwen2"], block_size=4, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=True)
    got, want = engine.generate(prompts[1:2], params)[0], off.generate(prompts[1:2], params)[0]
    assert engine.block_manager.hits == hits  # no cached block taken
    assert got["token_ids"] == want["token_ids"] and len(got["prompt_logprobs"]) == len(prompts[1])
    assert max(abs(a - b) for a, b in zip(got["prompt_logprobs"][1:], want["prompt_logprobs"][1:])) <= LOGPROB_ATOL


def test_aborts_and_preemption_leave_no_leaked_ref_count(tiny_models):
    engine = make_engine(tiny_models["mistral"], num_kv_blocks=36, block_size=4, max_num_batched_tokens=24,
                         max_model_len=128)
    prompts = shared_prefix_prompts(engine)
    engine.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0))
    sampled = SamplingParams(max_tokens=40, temperature=0.8, ignore_eos=True)
    for i in range(8):
        engine.add_request(f"r{i}", prompts[i % len(prompts)], SamplingParams(**{**vars(sampled), "seed": i}))
    shared_seen = False
    for step in range(200):
        engine.step()
        bm = engine.block_manager
        bm.check_invariants()
        shared_seen |= max(bm.ref_counts) > 1
        if step in (3, 9):  # abort some mid-prefill or mid-decode, sharing blocks with others
            for rid in list(engine.requests)[:2]:
                engine.abort(rid)
        if not engine.has_unfinished():
            break
    assert shared_seen and engine.scheduler.num_preemptions > 0
    assert_no_leak(engine)
    assert engine.block_manager.hits > 0
