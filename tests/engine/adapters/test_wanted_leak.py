"""A request aborted while its adapter loads or waits for a slot must not keep that adapter's
host copy pinned for good (the "wanted" mark leaked: host RAM grew with every such abort)."""
from loraplex.engine.core.sampling_params import SamplingParams
from tests.engine.adapters.conftest import make_engine, register_all, states, wait_for
from tests.engine.core.conftest import PROMPTS

LONG = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)


def test_abort_while_waiting_for_a_slot_releases_the_host_copy(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=1,
                         max_cpu_adapters=1)
    register_all(engine, tiny_adapters["llama"])
    engine.add_request("hot", PROMPTS[0], LONG, "qv-r4")  # holds the only slot
    wait_for(lambda: engine.step() is not None and len(engine.scheduler.running) == 1)
    engine.add_request("cold", PROMPTS[1], SHORT, "patterns-r8")  # loads, then waits for the slot
    wait_for(lambda: engine.step() is not None and states(engine)["patterns-r8"] == "host")
    engine.abort("cold")
    engine.abort("hot")
    # Others cycle through the one slot; with room for one host copy, the aborted request's
    # adapter must be evicted like any other.
    for name in ("all-r16-rslora", "mlp-layer1-r2"):
        engine.generate([PROMPTS[0]], SHORT, [name])
    assert states(engine)["patterns-r8"] == "registered", states(engine)


def test_abort_while_loading_releases_the_host_copy(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_active_adapters=1,
                         max_cpu_adapters=1)
    register_all(engine, tiny_adapters["llama"])
    engine.add_request("cold", PROMPTS[1], SHORT, "patterns-r8")  # the load starts at once
    engine.abort("cold")  # before any step: the adapter is still loading
    wait_for(lambda: states(engine)["patterns-r8"] != "loading")
    for name in ("all-r16-rslora", "mlp-layer1-r2"):
        engine.generate([PROMPTS[0]], SHORT, [name])
    assert states(engine)["patterns-r8"] == "registered", states(engine)
