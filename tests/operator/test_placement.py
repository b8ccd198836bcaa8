"""Warm placement (placement.py): spread by rendezvous hashing, least-loaded, and how few
adapters move when pods come and go."""
from __future__ import annotations

from loraplex.operator import placement as P

ADAPTERS = [f"tenant-{i:04d}" for i in range(2000)]


def wants(replicas=2, policy=P.SPREAD):
    return [P.Want(a, replicas, policy) for a in ADAPTERS]


def test_resolve_defaults_from_the_base_and_preload_is_everywhere():
    assert P.resolve(None, None, False) == (2, "spread")
    assert P.resolve(None, {"replicas": 3, "policy": "least-loaded"}, False) == (3, "least-loaded")
    assert P.resolve({"replicas": "all"}, {"replicas": 3}, False) == ("all", "spread")
    assert P.resolve({"replicas": 1}, None, True) == ("all", "spread")


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
