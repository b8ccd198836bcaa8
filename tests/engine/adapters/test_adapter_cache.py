"""The tiered adapter cache: LRU order, pinning, preload, reload, bounded host memory."""
import gc
import os
import threading

import pytest

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.manifest import AdapterManifest
from tests.engine.core.conftest import PROMPTS
from tests.engine.adapters.conftest import make_engine, register_all, states, wait_for

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
NAMES = ["qv-r4", "all-r16-rslora", "patterns-r8", "mlp-layer1-r2"]


def test_device_and_host_tiers_evict_least_recently_used(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=2,
                         max_cpu_adapters=3)
    register_all(engine, tiny_adapters["llama"])
    assert set(states(engine).values()) == {"registered"}  # just-in-time: nothing loads before use
    for name in NAMES[:3]:
        engine.generate([PROMPTS[0]], GREEDY, [name])
    # slots hold the two most recent; the first fell back to host RAM
    assert states(engine) == {"qv-r4": "host", "all-r16-rslora": "device", "patterns-r8": "device",
                              "mlp-layer1-r2": "registered"}
    engine.generate([PROMPTS[0]], GREEDY, ["mlp-layer1-r2"])
    # host cap 3: the least recently used adapter without a slot is dropped to disk
    assert states(engine) == {"qv-r4": "registered", "all-r16-rslora": "host", "patterns-r8": "device",
                              "mlp-layer1-r2": "device"}
    assert engine.adapters.counters.evictions == {"device": 2, "host": 1}


def test_reload_after_eviction_gives_identical_outputs(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["qwen2"], adapter_dir=str(tiny_adapters["qwen2"]), max_active_adapters=2,
                         max_cpu_adapters=2)
    register_all(engine, tiny_adapters["qwen2"])
    first = engine.generate([PROMPTS[1]], GREEDY, ["all-r16-rslora"])[0]["token_ids"]
    for name in [n for n in NAMES if n != "all-r16-rslora"] * 2:  # churn both tiers
        engine.generate([PROMPTS[0]], GREEDY, [name])
    assert states(engine)["all-r16-rslora"] == "registered", states(engine)
    again = engine.generate([PROMPTS[1]], GREEDY, ["all-r16-rslora"])[0]["token_ids"]
    assert again == first


def test_running_adapters_are_pinned_and_others_wait(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=2)
    register_all(engine, tiny_adapters["llama"])
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], long, "qv-r4")
    engine.add_request("b", PROMPTS[1], long, "all-r16-rslora")
    wait_for(lambda: (engine.step() is not None) and len(engine.scheduler.running) == 2)
    engine.add_request("c", PROMPTS[2], GREEDY, "patterns-r8")
    wait_for(lambda: states(engine)["patterns-r8"] == "host")  # loaded off the loop meanwhile
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = engine.num_steps
        # c can only start after a or b releases its slot
        if "c" not in finished and "a" not in finished and "b" not in finished:
            assert states(engine)["patterns-r8"] == "host"
    assert finished["c"] > min(finished["a"], finished["b"])


def test_preloaded_adapter_is_resident_and_never_evicted(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=2,
                         max_cpu_adapters=1)
    register_all(engine, tiny_adapters["llama"], names=NAMES[1:])
    engine.adapters.register(AdapterManifest(name="qv-r4", uri=str(tiny_adapters["llama"] / "qv-r4"), preload=True))
    assert engine.adapters.preload_ready() == (False, ["qv-r4"])
    wait_for(lambda: (engine.step() is not None) and engine.adapters.preload_ready()[0])
    for name in NAMES[1:] * 2:
        engine.generate([PROMPTS[0]], GREEDY, [name])
    assert states(engine)["qv-r4"] == "device"
    # a second preload would leave no slot for on-demand adapters: refused
    from loraplex.engine.core.errors import RequestError

    with pytest.raises(RequestError, match="preload"):
        engine.adapters.register(AdapterManifest(name="patterns-r8", uri=str(tiny_adapters["llama"] / "patterns-r8"),
                                                 preload=True))


def test_unregister_while_running_finishes_the_running_request(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]))
    register_all(engine, tiny_adapters["llama"], names=["qv-r4"])
    expected = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), ["qv-r4"])
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), "qv-r4")
    tokens = []
    for _ in range(3):
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert engine.adapters.unregister("qv-r4")
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    assert tokens == expected[0]["token_ids"]
    assert engine.adapters.slots.owner == [None] * engine.adapters.num_slots  # slot freed after the last user
    from loraplex.engine.core.errors import UnknownAdapterError

    with pytest.raises(UnknownAdapterError):
        engine.add_request("b", PROMPTS[0], GREEDY, "qv-r4")


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_host_memory_does_not_grow_over_1000_load_evict_cycles(tiny_models, tiny_adapters):
    """Every cycle loads an adapter from disk into RAM, places it in a device slot and evicts
    another from both tiers. RSS is measured after a warm-up, and again after 1,000 cycles."""
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=1,
                         max_cpu_adapters=1)
    register_all(engine, tiny_adapters["llama"])
    mgr = engine.adapters
    seqs = {n: engine.make_sequence(f"s-{n}", PROMPTS[0], GREEDY, n) for n in NAMES}

    def cycle(i):
        seq = seqs[NAMES[i % len(NAMES)]]
        wait_for(lambda: mgr.acquire(seq), timeout=10)
        mgr.release(seq)

    for i in range(100):
        cycle(i)
    gc.collect()
    before = rss_bytes()
    for i in range(1000):
        cycle(i)
    gc.collect()
    growth = rss_bytes() - before
    print(f"\nRSS growth over 1000 adapter load/evict cycles: {growth / 2**20:.2f} MiB")
    assert mgr.counters.loads[("disk", "ok")] >= 1100
    assert growth < 16 * 2**20  # one tiny adapter is ~50 KiB: a leak would show as ~50 MiB here
    assert threading.active_count() < 20
