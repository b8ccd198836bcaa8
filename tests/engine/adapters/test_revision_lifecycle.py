"""How a revision comes and goes in one engine. A plain adapter that becomes a revision of the same
files keeps its weights and slot. A revision dropped from its name's set while a request still
needs it (no drain): the request
finishes on that revision's weights even when it is preempted after the drop and must get its
device slot again, or when it chose the revision just before the drop and reaches the step loop
just after; the revision is forgotten once nothing holds it and its grace period is over, and no
new request can pick or pin it in between. On a real engine (tiny model, real adapters), the test
driving the steps."""
from __future__ import annotations

from loraplex.engine.core.adapters import revisions
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.manifest import AdapterManifest
from tests.engine.adapters.conftest import make_engine
from tests.engine.core.conftest import PROMPTS

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def revisioned(root, *revs: tuple[int, str, int]) -> AdapterManifest:
    return AdapterManifest(name="x", uri=str(root / revs[-1][1]), revisions=[
        {"number": n, "uri": str(root / folder), "percent": p} for n, folder, p in revs])


def step(engine, tokens: dict[str, list[int]]) -> None:
    for out in engine.step():
        assert out.error is None, out.error
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)


def reference(engine, root, tokens: dict[str, list[int]]) -> None:
    engine.adapters.register(AdapterManifest(name="reference", uri=str(root / "qv-r4")))
    engine.add_request("ref", PROMPTS[1], GREEDY, "reference")
    while engine.has_unfinished():
        step(engine, tokens)


def sweep(mgr) -> None:
    mgr.last_sweep = 0.0
    mgr.on_step()


def test_a_request_preempted_after_its_revision_was_dropped_finishes_on_its_weights(tiny_models, tiny_adapters,
                                                                                    monkeypatch):
    monkeypatch.setattr(revisions, "RETIRE_GRACE_SECONDS", 0.0)  # only what holds it keeps it
    root = tiny_adapters["llama"]
    engine = make_engine(tiny_models["llama"], adapter_dir=str(root))
    mgr = engine.adapters
    tokens: dict[str, list[int]] = {}
    reference(engine, root, tokens)

    mgr.register(revisioned(root, (1, "qv-r4", 100)))
    seq = engine.add_request("a", PROMPTS[1], GREEDY, "x@1")
    while not tokens.get("a"):
        step(engine, tokens)
    engine.scheduler._preempt(seq)  # as KV pressure would: slot released, back to waiting
    mgr.register(revisioned(root, (1, "qv-r4", 0), (2, "patterns-r8", 100)))
    mgr.register(revisioned(root, (2, "patterns-r8", 100)))  # revision 1 is dropped while the request waits
    sweep(mgr)
    assert mgr.registry.get("x@1") is not None  # held by the waiting request
    assert mgr.revision_set("x").get(1) is None  # nothing new can pick or pin it
    while engine.has_unfinished():
        step(engine, tokens)
    assert tokens["a"] == tokens["ref"]
    assert seq.num_preemptions == 1
    sweep(mgr)  # forgotten once nothing holds it
    assert mgr.registry.get("x@1") is None
    assert [r["number"] for r in mgr.get("x")["revisions"]] == [2]


def test_a_request_that_chose_a_revision_just_before_it_was_dropped_still_gets_it(tiny_models, tiny_adapters):
    root = tiny_adapters["llama"]
    engine = make_engine(tiny_models["llama"], adapter_dir=str(root))
    mgr = engine.adapters
    tokens: dict[str, list[int]] = {}
    reference(engine, root, tokens)
    mgr.register(revisioned(root, (1, "qv-r4", 100)))
    chosen = mgr.revision_set("x").choose("a session")  # the HTTP side resolved the name...
    mgr.register(revisioned(root, (2, "patterns-r8", 100)))  # ...then the operator shifted traffic
    sweep(mgr)
    engine.add_request("a", PROMPTS[1], GREEDY, chosen.key)  # ...then the request reached the step loop
    while engine.has_unfinished():
        step(engine, tokens)
    assert chosen.number == 1 and tokens["a"] == tokens["ref"]
    mgr.retiring[chosen.key] = 0.0  # the grace period is over
    sweep(mgr)
    assert mgr.registry.get("x@1") is None


def test_a_plain_adapter_becoming_revision_1_keeps_its_weights_slot_and_running_requests(tiny_models, tiny_adapters):
    """A LoraAdapter from before revisions: the operator's first revisioned push names its files
    revision 1. Nothing loads again, and a request running on the plain name finishes."""
    root = tiny_adapters["llama"]
    engine = make_engine(tiny_models["llama"], adapter_dir=str(root))
    mgr = engine.adapters
    tokens: dict[str, list[int]] = {}
    reference(engine, root, tokens)
    mgr.register(AdapterManifest(name="x", uri=str(root / "qv-r4")))
    engine.add_request("a", PROMPTS[1], GREEDY, "x")
    while not tokens.get("a"):
        step(engine, tokens)
    loads = dict(mgr.counters.loads)
    slot = mgr.registry.get("x").slot

    mgr.register(revisioned(root, (1, "qv-r4", 100)))
    assert mgr.registry.get("x") is None and mgr.registry.get("x@1").slot == slot
    engine.add_request("b", PROMPTS[1], GREEDY, "x@1")
    while engine.has_unfinished():
        step(engine, tokens)
    assert tokens["a"] == tokens["b"] == tokens["ref"]
    assert mgr.counters.loads == loads  # not from disk, not into another slot
    assert mgr.get("x")["revisions"][0]["state"] == "device"
