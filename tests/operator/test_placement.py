"""Warm placement (placement.py): spread by rendezvous hashing, least-loaded, how few adapters
move when pods come and go, auto placement's Wants, make-before-break, and what a new pod would
get (placed_on)."""
from __future__ import annotations

import pytest

from loraplex.operator import demand as D
from loraplex.operator import placement as P
from loraplex.operator.adapters import SpecProblem

ADAPTERS = [f"tenant-{i:04d}" for i in range(2000)]


def wants(replicas=2, policy=P.SPREAD):
    return [P.Want(a, replicas, policy) for a in ADAPTERS]


def test_resolve_defaults_from_the_base_and_preload_is_everywhere():
    assert P.resolve(None, None, False) == P.Spec(2, "spread")
    assert P.resolve(None, {"replicas": 3, "policy": "least-loaded"}, False) == P.Spec(3, "least-loaded")
    assert P.resolve({"replicas": "all"}, {"replicas": 3}, False) == P.Spec("all", "spread")
    assert P.resolve({"replicas": 1}, None, True) == P.Spec("all", "spread")
    assert P.resolve({"replicas": "auto"}, None, True) == P.Spec("all", "spread")


def test_resolve_auto_takes_its_fields_over_the_bases():
    base = {"replicas": 2, "min": 1, "max": 8, "targetRequestsPerPod": 1, "rateWindowSeconds": 60,
            "scaleDownDelaySeconds": 120}
    spec = P.resolve({"replicas": "auto", "max": 3, "targetRequestsPerPod": 1.5}, base, False)
    assert spec == P.Spec("auto", "spread", D.AutoPolicy(1, 3, 1.5, 60, 120))
    assert P.resolve(None, {**base, "replicas": "auto"}, False).replicas == "auto"


@pytest.mark.parametrize("own, words", [
    ({"replicas": "most"}, "placement.replicas must be a whole number"),
    ({"replicas": 0}, "placement.replicas must be a whole number"),
    ({"replicas": True}, "placement.replicas must be a whole number"),
    ({"policy": "random"}, "placement.policy must be one of spread, least-loaded"),
    ({"replicas": "auto", "min": 10}, "placement.min (10) must be <= placement.max (8)"),
])
def test_a_placement_the_operator_cannot_use_is_the_adapters_problem(own, words):
    with pytest.raises(SpecProblem) as e:
        P.resolve(own, {"max": 8}, False)
    assert e.value.reason == "InvalidPlacement" and words in e.value.message


def test_want_of_auto_follows_the_decision_inside_the_bounds():
    spec = P.Spec("auto", "spread", D.AutoPolicy(1, 3, 1.0, 60, 120))
    assert P.want_of("a", P.Spec(2, "spread"), None, 5) == (P.Want("a", 2, "spread"), None)
    want, reason = P.want_of("a", spec, None, 2)
    assert want == P.Want("a", 2, "spread") and "no request rate measured yet" in reason
    want, reason = P.want_of("a", spec, D.Warmth(3, "3 pods: 4 req/s over 60 s, target 1/pod"), 1)
    assert want.replicas == 3 and reason.startswith("3 pods: 4 req/s")
    want, reason = P.want_of("a", spec, D.Warmth(7, "7 pods: ..."), 1)  # the bounds changed since
    assert want.replicas == 3 and reason == "3 pods: held inside [1, 3]"
    wants, reasons = P.wants_of({"a": spec, "b": P.Spec("all")}, {"a": {"status": {"placement": ["p0"]}}, "b": {}},
                                {})
    assert wants == {"a": P.Want("a", 1, "spread"), "b": P.Want("b", "all")} and set(reasons) == {"a"}


def test_settled_means_servable_on_every_placed_pod():
    placed = {"a": ["p0", "p1"], "b": ["p0"], "c": [], "d": ["p2"]}
    servable = {("a", "p0"), ("a", "p1"), ("b", "p0"), ("d", "p0")}
    assert P.settled(placed, lambda n, p: (n, p) in servable) == {"a", "b"}


def test_spread_growth_keeps_every_pod_it_had():
    """An auto adapter's count going 1 -> 2 -> 3 only adds pods (rendezvous top-N is a prefix), and
    going back down only drops: a count change never moves it."""
    pods = [f"p{i}" for i in range(6)]
    for name in ADAPTERS[:200]:
        sets = [set(P.place([P.Want(name, n)], pods)[name]) for n in range(1, 7)]
        assert all(a < b for a, b in zip(sets, sets[1:]))


def test_placed_on_a_pod_not_seen_yet_hottest_first():
    pods = ["p0", "p1", "p2"]
    wants = [P.Want(a, 2) for a in ADAPTERS[:300]]
    rates = {a: float(i % 7) for i, a in enumerate(ADAPTERS[:300])}
    cands = [P.Candidate(w, rates[w.name]) for w in wants]
    got = P.placed_on("p-new", pods, cands)
    expect = P.by_pod(P.place(wants, pods + ["p-new"]))["p-new"]
    assert set(got) == expect and got
    assert [rates[a] for a in got] == sorted((rates[a] for a in got), reverse=True), "hottest first"
    assert P.placed_on("p0", pods, cands) == sorted(P.by_pod(P.place(wants, pods))["p0"],
                                                    key=lambda a: (-rates[a], a)), "a known pod: its own set"
    # least-loaded: a settled fleet is not reshuffled; a new pod is the emptiest, so it gets the
    # replicas that are missing.
    sticky = [P.Candidate(P.Want(a, 1, P.LEAST_LOADED), 1.0, (pods[i % 3],)) for i, a in enumerate(ADAPTERS[:6])]
    short = [P.Candidate(P.Want("short", 2, P.LEAST_LOADED), 9.0, ("p0",))]
    assert P.placed_on("p-new", pods, sticky + short) == ["short"]
    assert P.placed_on("p-new", pods, [P.Candidate(P.Want("all", "all"))]) == ["all"]


def test_memory_placed_on_reads_the_last_placement_of_the_base():
    memory = P.PlacementMemory()
    adapters = {a: {"status": {}} for a in ADAPTERS[:50]}
    placed = P.place_adapters(memory, "ns", "base", {a: P.Want(a, 1) for a in adapters}, adapters, ["p0", "p1"])
    assert set(P.by_pod(placed)["p0"]) == set(memory.placed_on("ns", "base", "p0", {}))
    hot = sorted(P.by_pod(placed)["p1"])[-1]
    assert memory.placed_on("ns", "base", "p1", {hot: 5.0})[0] == hot
    assert memory.placed_on("ns", "other", "p0", {}) == []


def test_spread_is_even_and_moves_only_what_it_must():
    two = P.place(wants(), ["p0", "p1"])
    assert all(v == ["p0", "p1"] for v in two.values())
    four = P.place(wants(), ["p0", "p1", "p2", "p3"])
    load = {p: len(v) for p, v in P.by_pod(four).items()}
    assert all(abs(n - 1000) < 120 for n in load.values()), load   # 2000 * 2 / 4 each, +-12 %
    assert all(len(v) == 2 for v in four.values())
    # Scaling 4 -> 3: only the adapters that were on the removed pod move.
    three = P.place(wants(), ["p0", "p1", "p2"])
    moved = [a for a in ADAPTERS if set(three[a]) != set(four[a])]
    assert set(moved) == {a for a in ADAPTERS if "p3" in four[a]}
    assert P.place(wants(), ["p0", "p1", "p2"]) == three, "deterministic: no memory needed"


def test_least_loaded_is_sticky_and_fills_new_pods():
    two = P.place(wants(1, P.LEAST_LOADED), ["p0", "p1"])
    assert {p: len(v) for p, v in P.by_pod(two).items()} == {"p0": 1000, "p1": 1000}
    four = P.place(wants(1, P.LEAST_LOADED), ["p0", "p1", "p2", "p3"], previous=two)
    assert four == two, "a settled fleet is not reshuffled"
    more = [P.Want(f"new-{i}", 1, P.LEAST_LOADED) for i in range(100)]
    four = P.place(wants(1, P.LEAST_LOADED) + more, ["p0", "p1", "p2", "p3"], previous=two)
    assert {tuple(four[w.name]) for w in more} <= {("p2",), ("p3",)}, "new adapters go to the emptiest pods"
    # Pod p1 goes: its adapters move to the least loaded pods, the rest stay.
    three = P.place(wants(1, P.LEAST_LOADED), ["p0", "p2", "p3"], previous=two)
    assert all(three[a] == ["p0"] for a in ADAPTERS if two[a] == ["p0"])
    assert all(three[a] in (["p2"], ["p3"]) for a in ADAPTERS if two[a] == ["p1"])


def test_all_and_more_replicas_than_pods():
    out = P.place([P.Want("a", "all"), P.Want("b", 5)], ["p0", "p1", "p2"])
    assert out == {"a": ["p0", "p1", "p2"], "b": ["p0", "p1", "p2"]}
    assert P.place([P.Want("a", 2)], []) == {"a": []}


def test_candidates_from_the_api_objects_alone():
    """Where no pass ran (a standby), `placed_on`'s input comes from the LoraAdapters themselves."""
    objs = [{"metadata": {"name": "auto-a"}, "spec": {"placement": {"replicas": "auto", "max": 4}},
             "status": {"placement": ["p0", "p1"]}},
            {"name": "fixed", "spec": {}, "status": {}},
            {"name": "pre", "spec": {"preload": True}},
            {"name": "broken", "spec": {"placement": {"replicas": "most"}}}]
    got = {c.want.name: c for c in P.candidates(objs, {"placement": {"replicas": 1}}, {"auto-a": 2.5})}
    assert set(got) == {"auto-a", "fixed", "pre"}
    assert got["auto-a"] == P.Candidate(P.Want("auto-a", 2, "spread"), 2.5, ("p0", "p1"))
    assert got["fixed"].want == P.Want("fixed", 1, "spread") and got["pre"].want.replicas == "all"
    assert P.placed_on("p9", ["p0", "p1"], got.values())[0] in ("auto-a", "pre")
