"""The adapter manager's side of a warm start (core/adapters/warming.py) and its residency view, on a
real engine (tiny model, real adapters), with the test playing the step thread (`on_step`).

- warm adapters load hottest first, fill the free device slots hottest first, never take a
  preload's slot, and after the warm start the coldest of them is the first evicted;
- a host tier too small for the list: nothing warmed is evicted for a later one, the warm start
  sees it is stuck (and ends early), and the loads it could not start are dropped;
- residency: the adapters in the device and host tiers, the most recently used first, capped.
"""
from __future__ import annotations

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.manifest import AdapterManifest
from tests.engine.adapters.conftest import make_engine, states, wait_for
from tests.engine.core.conftest import PROMPTS

HOTTEST_FIRST = ["all-r16-rslora", "patterns-r8", "mlp-layer1-r2"]
SHORT = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)


def register(engine, root, names, **fields):
    for name in names:
        engine.adapters.register(AdapterManifest(name=name, uri=str(root / name), **fields))


def test_warm_adapters_fill_free_slots_hottest_first_and_the_coldest_goes_first(tiny_models, tiny_adapters):
    root = tiny_adapters["llama"]
    engine = make_engine(tiny_models["llama"], adapter_dir=str(root), max_active_adapters=3)
    mgr = engine.adapters
    register(engine, root, ["qv-r4"], preload=True)
    register(engine, root, HOTTEST_FIRST)
    mgr.warm(HOTTEST_FIRST)
    # The loads run on the manager's pool; nothing reaches a slot before the step thread runs.
    wait_for(lambda: mgr.warm_progress().resident == 3 and states(engine)["qv-r4"] == "host")
    progress = mgr.warm_progress()
    assert (progress.listed, progress.settled, progress.done, progress.stuck) == (3, 3, True, False)
    mgr.on_step()  # the preload takes its slot first; the two free slots go to the two hottest
    assert states(engine) == {"qv-r4": "device", "all-r16-rslora": "device", "patterns-r8": "device",
                              "mlp-layer1-r2": "host"}
    mgr.end_warm()
    assert not mgr.warming and not any(e.warming for e in mgr.registry)
    # A request for the one left in RAM needs a slot: the coldest device-resident warm adapter
    # gives it up, never the preload and never the hottest.
    engine.generate([PROMPTS[0]], SHORT, ["mlp-layer1-r2"])
    assert states(engine) == {"qv-r4": "device", "all-r16-rslora": "device", "patterns-r8": "host",
                              "mlp-layer1-r2": "device"}
    assert mgr.counters.loads[("disk", "ok")] == 4  # one load each, from the warm start


def test_a_full_host_tier_stops_the_warm_start_without_evicting_what_it_warmed(tiny_models, tiny_adapters):
    root = tiny_adapters["llama"]
    names = [*HOTTEST_FIRST, "qv-r4"]
    engine = make_engine(tiny_models["llama"], adapter_dir=str(root), max_active_adapters=1, max_cpu_adapters=2)
    mgr = engine.adapters
    register(engine, root, names)
    mgr.warm(names)
    wait_for(lambda: mgr.warm_progress().done)
    progress = mgr.warm_progress()
    assert progress.stuck and 2 <= progress.resident < len(names)
    resident = [n for n in names if states(engine)[n] in ("host", "device")]
    assert resident == names[:progress.resident]  # the hottest, in order
    assert mgr.counters.evictions.get("host", 0) == 0  # none of them pushed out for a colder one
    mgr.end_warm()
    left = names[progress.resident:]
    assert not set(left) & set(mgr.prefetch_queue) and mgr.num_loading == 0  # the rest: just in time
    assert all(states(engine)[n] == "registered" for n in left)
    # Just in time works as ever: a request loads what the warm start left out.
    engine.generate([PROMPTS[1]], SHORT, [left[-1]])
    assert states(engine)[left[-1]] == "device"


def test_residency_is_most_recent_first_and_capped(tiny_models, tiny_adapters):
    root = tiny_adapters["llama"]
    engine = make_engine(tiny_models["llama"], adapter_dir=str(root), max_active_adapters=2)
    mgr = engine.adapters
    names = ["qv-r4", "patterns-r8", "mlp-layer1-r2"]
    register(engine, root, names + ["all-r16-rslora"])  # the last is registered, never loaded
    for name in names:
        engine.generate([PROMPTS[2]], SHORT, [name])
    tiers = states(engine)
    rows, left_out = mgr.residency(2)
    assert rows == [("mlp-layer1-r2", tiers["mlp-layer1-r2"]), ("patterns-r8", tiers["patterns-r8"])]
    assert left_out == 1
    everything, none_left = mgr.residency(256)
    assert [n for n, _ in everything] == list(reversed(names)) and none_left == 0
    assert {t for _, t in everything} <= {"device", "host"} and tiers["all-r16-rslora"] == "registered"
    assert mgr.on_device() == sorted(n for n in names if tiers[n] == "device")
    assert mgr.residency(0) == ([], 3)


def test_a_warm_start_warms_the_revisions_that_take_traffic_and_residency_names_the_adapter(tiny_models,
                                                                                           tiny_adapters):
    """The catalog's placement names adapters; a revisioned one warms its revisions with percent
    > 0 (newest first), never a 0 % one, and routers see the adapter's name, once per tier."""
    root = tiny_adapters["llama"]
    engine = make_engine(tiny_models["llama"], adapter_dir=str(root), max_active_adapters=3)
    mgr = engine.adapters
    mgr.register(AdapterManifest.model_validate({"name": "rev", "uri": str(root / "qv-r4"), "revisions": [
        {"number": 1, "uri": str(root / "qv-r4"), "percent": 60},
        {"number": 2, "uri": str(root / "patterns-r8"), "percent": 40},
        {"number": 3, "uri": str(root / "mlp-layer1-r2"), "percent": 0}]}))
    mgr.warm(["rev"])
    assert mgr.warming == ["rev@2", "rev@1"]
    wait_for(lambda: mgr.warm_progress().done)
    mgr.on_step()  # both into free slots
    mgr.end_warm()
    revisions = {r["number"]: r["state"] for r in mgr.get("rev")["revisions"]}
    assert revisions == {1: "device", 2: "device", 3: "registered"} and mgr.get("rev")["state"] == "device"
    assert mgr.residency(10) == ([("rev", "device")], 0) and mgr.on_device() == ["rev"]
    assert [a["name"] for a in mgr.list()] == ["rev"]


def test_a_load_a_request_waits_for_goes_ahead_of_every_prefetch(tiny_models, tiny_adapters):
    """A wave of prefetches (revisions warmed before a shift, a warm start, preloads) never queues a
    request's load behind it: with one loader busy, the request's adapter is the next to load."""
    import threading

    root = tiny_adapters["llama"]
    engine = make_engine(tiny_models["llama"], adapter_dir=str(root), adapter_load_workers=1)
    mgr = engine.adapters
    prefetched, requested = HOTTEST_FIRST, "qv-r4"
    register(engine, root, [*prefetched, requested])
    started, gate, load = [], threading.Event(), mgr._load

    def recorded(entry):
        started.append(entry.name)
        gate.wait(30)  # the first load holds the only loader until the queue is set up
        return load(entry)
    mgr._load = recorded
    for name in prefetched:
        mgr.request_load(name)
    engine.add_request("r", PROMPTS[0], SHORT, requested)
    engine.step()  # the scheduler asks for the request's adapter
    gate.set()
    wait_for(lambda: all(states(engine)[n] in ("host", "device") for n in [*prefetched, requested]))
    assert started == [prefetched[0], requested, *prefetched[1:]]
