"""Prefix caching with adapters: the cache is keyed by the adapter's identity (name and content
digest). Mixed batches of base and adapter rows give the same tokens with the cache on and off
(logprobs within 1e-4), and a prefix computed under one adapter is never reused by another."""
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.manifest import AdapterManifest
from tests.engine.adapters.conftest import make_engine, register_all
from tests.engine.core.conftest import PROMPTS

LOGPROB_ATOL = 1e-4
ADAPTERS = [None, "qv-r4", "all-r16-rslora", "patterns-r8", None, "qv-r4"]


def engine_with_adapters(tiny_models, tiny_adapters, **overrides):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), block_size=4, **overrides)
    register_all(engine, tiny_adapters["llama"])
    return engine


def prompts_with_prefix(engine, n: int) -> list[list[int]]:
    prefix = engine.tokenizer.encode(PROMPTS[2])  # 41 tokens: 10 full blocks of 4
    return [prefix + engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def test_mixed_base_and_adapter_batches_equal_with_the_cache_on_and_off(tiny_models, tiny_adapters):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    results = {}
    for on in (True, False):
        engine = engine_with_adapters(tiny_models, tiny_adapters, enable_prefix_caching=on, max_active_adapters=3)
        prompts = prompts_with_prefix(engine, len(ADAPTERS))
        warm = engine.generate(prompts[:4], params, ADAPTERS[:4])  # caches the prefix under 4 identities
        mixed = engine.generate(prompts, params, ADAPTERS)  # base and adapter rows in one batch
        results[on] = (warm + mixed, engine.block_manager.hits)
        # rows 0-3 repeat a warm prompt under the same identity: all their full blocks but the
        # last token's hit; rows 4-5 share only the 10 prefix blocks with a warm row of theirs
        expected_hits = sum((len(p) - 1) // 4 * 4 for p in prompts[:4]) + 2 * 40
        bm = engine.block_manager
        bm.check_invariants()
        assert bm.num_free == bm.num_blocks and not any(bm.ref_counts)
    for got, want in zip(results[True][0], results[False][0]):
        assert got["token_ids"] == want["token_ids"]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(got["logprobs"], want["logprobs"])) <= LOGPROB_ATOL
    assert results[False][1] == 0
    assert results[True][1] == expected_hits
    # the adapters really differ from the base, or sharing across them would go unnoticed
    outs = results[True][0][4:]
    assert outs[0]["token_ids"] != outs[1]["token_ids"] or outs[0]["token_ids"] != outs[2]["token_ids"]


def test_the_same_prefix_under_two_adapters_is_not_shared(tiny_models, tiny_adapters):
    engine = engine_with_adapters(tiny_models, tiny_adapters)
    prompts = prompts_with_prefix(engine, 4)
    params = SamplingParams(max_tokens=2, temperature=0)
    bm = engine.block_manager

    def hits_of(prompt, adapter) -> int:
        before = bm.hits
        engine.generate([prompt], params, [adapter])
        return bm.hits - before

    assert hits_of(prompts[0], "qv-r4") == 0
    assert hits_of(prompts[1], "all-r16-rslora") == 0  # same 41-token prefix, other adapter
    assert hits_of(prompts[2], None) == 0  # nor the base
    assert hits_of(prompts[3], "qv-r4") == 40  # its own: 10 blocks


def test_a_re_registered_adapter_with_other_weights_never_hits(tiny_models, tiny_adapters):
    root = tiny_adapters["llama"]
    engine = engine_with_adapters(tiny_models, tiny_adapters)
    off = engine_with_adapters(tiny_models, tiny_adapters, enable_prefix_caching=False)
    prompts = prompts_with_prefix(engine, 3)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for e in (engine, off):
        e.adapters.register(AdapterManifest(name="x", uri=str(root / "qv-r4")))
    engine.generate(prompts[:1], params, ["x"])
    for e in (engine, off):  # same name, other weights
        e.adapters.register(AdapterManifest(name="x", uri=str(root / "all-r16-rslora")))
    before = engine.block_manager.hits
    got = engine.generate(prompts[1:2], params, ["x"])[0]
    assert engine.block_manager.hits == before
    assert got["token_ids"] == off.generate(prompts[1:2], params, ["x"])[0]["token_ids"]
    # and back to the first weights under the name: their digest matches the cached blocks again
    engine.adapters.register(AdapterManifest(name="x", uri=str(root / "qv-r4")))
    engine.generate(prompts[2:3], params, ["x"])
    assert engine.block_manager.hits == before + 40
