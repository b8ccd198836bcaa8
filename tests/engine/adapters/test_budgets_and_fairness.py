"""Byte budgets per tier, and fairness of admission across adapters (engine level, step by step)."""
import math

import pytest

from loraplex.engine.core.adapters.device_slots import slot_bytes
from loraplex.engine.core.adapters.resolver import NegativeCache
from loraplex.engine.core.errors import UnknownAdapterError
from loraplex.engine.core.sampling_params import SamplingParams
from tests.engine.adapters.conftest import make_engine, register_all, states, wait_for
from tests.engine.core.conftest import PROMPTS

NAMES = ["qv-r4", "all-r16-rslora", "patterns-r8", "mlp-layer1-r2"]
SHORT = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)


def test_device_byte_budget_sets_the_slot_count(tiny_models, tiny_adapters):
    probe = make_engine(tiny_models["llama"], max_active_adapters=1)
    per_slot = slot_bytes(probe.model_config, 16, probe.dtype)
    engine = make_engine(tiny_models["llama"], max_active_adapters=8, adapter_device_bytes=int(2.5 * per_slot))
    assert engine.adapters.num_slots == 2
    assert engine.adapters.tier_bytes()["device"] == (0, 2 * per_slot)
    capped = make_engine(tiny_models["llama"], max_active_adapters=3, adapter_device_bytes=100 * per_slot)
    assert capped.adapters.num_slots == 3  # --max-active-adapters stays a cap
    with pytest.raises(ValueError, match="holds no slot"):
        make_engine(tiny_models["llama"], adapter_device_bytes=per_slot - 1)


def test_host_tier_stays_within_its_byte_budget(tiny_models, tiny_adapters):
    sizes = {}
    probe = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=4)
    register_all(probe, tiny_adapters["llama"])
    probe.generate([PROMPTS[0]] * 4, SHORT, NAMES)
    sizes = {a["name"]: a["bytes"] for a in probe.adapters.list()}
    budget = sizes["all-r16-rslora"] + sizes["qv-r4"]  # room for two of the four
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=1,
                         adapter_host_bytes=budget)
    register_all(engine, tiny_adapters["llama"])
    mgr = engine.adapters
    peak = 0
    for i in range(24):
        name = NAMES[(i * 3) % 4]
        engine.add_request(f"r{i}", PROMPTS[i % 3], SHORT, name)
        while engine.has_unfinished():
            engine.step()
            peak = max(peak, mgr.host.bytes)
    print(f"\nhost tier peak {peak} bytes, budget {budget}, largest adapter {max(sizes.values())}")
    # within budget, plus at most the one load the engine lets through when nothing is staged
    assert peak <= budget + max(sizes.values())
    assert mgr.host.bytes <= budget
    assert mgr.counters.evictions["host"] > 0


def test_negative_cache_is_bounded_and_expires():
    cache = NegativeCache(ttl_seconds=30, max_entries=3)
    for i in range(10):
        cache.put(f"n{i}", UnknownAdapterError(f"the model 'n{i}' does not exist", param="model"))
    assert len(cache) == 3 and cache.get("n0") is None and cache.get("n9") is not None
    first, second = cache.get("n9"), cache.get("n9")
    assert first is not second and first.__traceback__ is None  # raised again and again: fresh copies
    expired = NegativeCache(ttl_seconds=0.0, max_entries=3)
    expired.put("x", UnknownAdapterError("gone"))
    assert expired.get("x") is None


def run_hot_and_cold(engine, hot, cold, hot_tokens, per_adapter, max_steps):
    """Keep `per_adapter` requests of `hot_tokens` in flight on each hot adapter (a new one as soon
    as one ends, so their slots never drain by themselves); once they hold every slot, add one
    cold request. Returns the number of steps from the cold request's arrival to its first
    token, or None if it got none within max_steps."""
    # Every adapter is in host RAM first: a load takes wall time, not steps, and the bound is
    # about the wait for a slot.
    for name in [*hot, cold]:
        engine.adapters.request_load(name)
    wait_for(lambda: all(states(engine)[n] == "host" for n in [*hot, cold]))
    adapter_of = {}

    def add_hot(name, tokens=hot_tokens):
        rid = f"hot-{len(adapter_of)}"
        adapter_of[rid] = name
        engine.add_request(rid, PROMPTS[len(adapter_of) % 3],
                           SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), name)

    for name in hot:  # staggered lengths: an adapter's requests never all end in the same step
        for i in range(per_adapter):
            add_hot(name, hot_tokens - i * hot_tokens // per_adapter)
    arrived = None
    for step in range(max_steps):
        if arrived is None and all(states(engine)[n] == "device" for n in hot):
            engine.add_request("cold", PROMPTS[3], SHORT, cold)
            arrived = step
        for out in engine.step():
            if out.request_id == "cold" and out.new_token_ids:
                return step - arrived
            if out.finished and out.request_id in adapter_of:
                add_hot(adapter_of[out.request_id])
    return None


def test_a_cold_adapter_gets_a_slot_within_the_bound(tiny_models, tiny_adapters):
    hot_tokens, per_adapter = 12, 3
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=2,
                         max_num_seqs=8)
    register_all(engine, tiny_adapters["llama"])
    waited = run_hot_and_cold(engine, NAMES[:2], "patterns-r8", hot_tokens, per_adapter, max_steps=400)
    # Bound (docs/engine.md "Fairness"): once starved, the running sequences of one slot finish
    # (at most hot_tokens decode steps each, plus their prefill step), then the slot is its.
    print(f"\ncold request: first token {waited} steps after arrival (bound {hot_tokens + 1})")
    assert waited is not None and waited <= hot_tokens + 1


def test_without_aging_the_cold_adapter_starves(tiny_models, tiny_adapters):
    """The same traffic with the fairness rule pushed out of reach: the test above can fail."""
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=2,
                         max_num_seqs=8, adapter_fairness_seconds=math.inf)
    register_all(engine, tiny_adapters["llama"])
    assert run_hot_and_cold(engine, NAMES[:2], "patterns-r8", 12, 3, max_steps=150) is None
