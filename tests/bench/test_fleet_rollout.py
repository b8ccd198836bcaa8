"""The rollout scenario of the fleet simulator (bench/fleet_sim/revisions.py), on tiny fleets.

No timings: the checks are the accounting that holds whatever the costs are. Replace-in-place
makes each pod's first request for the new weights load them on the request path; warm before
shift never does on a placed pod; the old weights leave every pod; sessions never move back to
an older revision; the engine contract's sticky buckets split as the percents say.
"""
import hashlib
import heapq
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from loraplex.manifest import revision_key, split_revision

from bench.fleet_sim import cost as cost_model
from bench.fleet_sim.placement import PlacementRule
from bench.fleet_sim.policies import make_policy
from bench.fleet_sim.replica import Replica, ReplicaConfig, SimRequest
from bench.fleet_sim.revisions import RolloutRule, bucket, choose, simulate_rollout
from bench.fleet_sim.workload import FleetWorkload, generate

ROOT = Path(__file__).resolve().parents[2]
# 3 pods, 6 adapters, host RAM for all of them twice over (no LRU eviction muddles the count)
SPEC = FleetWorkload(num_adapters=6, rate=6.0, duration_s=240.0, seed=5)
RCFG = ReplicaConfig(device_slots=4, host_slots=16)
PODS = 3


@pytest.fixture(scope="module")
def costs():
    return cost_model.load()


def run(mode: str, costs, policy: str = "random", **rule):
    rule = RolloutRule(mode=mode, start_s=60.0, spread_s=30.0, step_s=20.0, check_s=2.0, sessions=20, **rule)
    return simulate_rollout(SPEC, generate(SPEC), RCFG, PODS, PlacementRule(mode="fixed", replicas=2),
                            make_policy(policy, PODS, 0), costs, rule, strict=True, warmup_s=10.0)


def new_revision_requests(sim) -> set[tuple[int, str]]:
    """(pod, key) of every request that chose a revision above 1."""
    return {(q.replica, q.adapter) for q in sim.requests if split_revision(q.adapter)[1] > 1}


def request_loads(sim) -> set[tuple[int, str]]:
    return {(pod, key) for _, pod, key, cause in sim.new_loads if cause == "request"}


def test_the_sticky_bucket_is_the_engine_contract_and_splits_by_percent():
    assert bucket("x", "u1") == int(hashlib.sha256(b"x\0u1").hexdigest()[:8], 16) % 10000
    sessions = [f"user-{i}" for i in range(5000)]
    picks = [choose([(2, 20.0), (1, 80.0)], bucket("support", s)) for s in sessions]
    assert abs(picks.count(2) / len(picks) - 0.2) < 0.03
    assert all(choose([(3, 0.0), (2, 100.0)], bucket("support", s)) == 2 for s in sessions)  # 0 %: never picked
    # as the newest revision's percent grows, no session moves back to the older one
    last = {s: 1 for s in sessions}
    for pct in (0, 10, 25, 50, 90, 100):
        for s in sessions:
            n = choose([(2, float(pct)), (1, 100.0 - pct)], bucket("support", s))
            assert n >= last[s]
            last[s] = n
    assert set(last.values()) == {2}


def test_replace_in_place_loads_the_new_weights_on_the_request_path_on_every_pod(costs):
    m, sim = run("in-place", costs)
    pairs = new_revision_requests(sim)
    hot = {split_revision(k)[0] for _, k in pairs if sum(1 for p, q in pairs if q == k) == PODS}
    assert hot  # random routing: the hot adapters reach every pod
    # each pod's first request for the new weights starts (or waits on) a request-path load
    assert pairs <= request_loads(sim)
    assert m["request_loads_new_placed"] + m["request_loads_new_other"] >= PODS * len(hot)
    # on every pod where the adapter was warm, its first request after the change found it cold
    assert m["first_cold_was_warm"] == m["first_was_warm"] >= PODS * len(hot)
    assert m["prefetch_loads_rollout"] == 0
    for r in sim.replicas:  # the old weights are gone everywhere
        assert not any(split_revision(k)[1] == 1 for k in list(r.host) + list(r.slot_of))


@pytest.mark.parametrize("mode", ["warm", "canary"])
def test_warm_before_shift_never_loads_a_new_revision_for_a_request_on_a_placed_pod(mode, costs):
    m, sim = run(mode, costs)
    placed = {(p, revision_key(sim.names[a], 2)) for a in range(SPEC.num_adapters) for p in sim.placement.placed[a]}
    assert new_revision_requests(sim) & placed  # the placed pods did serve the new revisions
    assert not request_loads(sim) & placed
    assert m["request_loads_new_placed"] == m["first_cold_placed"] == m["first_cold_was_warm_placed"] == 0
    assert {(p, k) for _, p, k, c in sim.new_loads if c == "prefetch"} == placed  # loaded ahead where placed
    assert m["rekeyed_requests"] == 0 and len(sim.shift_delay) == SPEC.num_adapters
    assert m["overlap_peak_adapters"] >= 1
    assert m["overlap_peak_bytes"] == m["overlap_peak_adapters"] * RolloutRule().adapter_bytes
    for r in sim.replicas:
        assert not any(split_revision(k)[1] == 1 for k in list(r.host) + list(r.slot_of))


def test_a_canary_moves_sessions_forward_only_and_holds_both_revisions_longer(costs):
    warm, _ = run("warm", costs)
    canary, sim = run("canary", costs)
    assert canary["sessions_switched"] > 0 and canary["sessions_flipped_back"] == 0
    served = {}
    for q in sorted(sim.requests, key=lambda q: q.arrival):  # per (adapter, session): 1...1 2...2
        name, n = split_revision(q.adapter)
        key = (name, int(sim.session[q.idx]))
        assert n >= served.get(key, 1)
        served[key] = n
    assert canary["overlap_peak_adapters"] >= warm["overlap_peak_adapters"]


def test_the_control_run_changes_nothing_and_counts_the_same_pairs(costs):
    m, sim = run("none", costs)
    assert all(split_revision(q.adapter)[1] == 1 for q in sim.requests)
    assert m["revisions_created"] == 0 and not sim.new_loads and m["first_requests"] > 0
    assert np.isnan(m["shift_delay_p50_s"]) and m["overlap_peak_adapters"] == 0


def test_quick_cli_writes_results_and_compares_against_the_control(tmp_path):
    out = tmp_path / "rollout"
    proc = subprocess.run([sys.executable, "-m", "bench.fleet_sim.rollout", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["strict"] is True
    modes = {a["mode"] for a in result["aggregate"]}
    assert modes == {"none", "in-place", "warm", "warm-resident", "canary"}
    for r in result["runs"]:
        if r["mode"] == "none":
            assert r["metrics"]["first_cold_was_warm_vs_none"] == 0
    md = (out / "results.md").read_text()
    assert "## Findings" in md and "| policy | mode |" in md and "replace in place" in md


class Loop:
    """Just enough of a Simulation for one Replica: an event heap and the load hooks."""

    strict = False

    def __init__(self):
        self.events, self.seq, self.loaded = [], 0, []

    def at(self, t, fn, arg):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn, arg))

    def count_load(self, tier, now):
        pass

    def load_started(self, replica, adapter, cause, now):
        pass

    def on_loaded(self, replica, adapter, now):
        self.loaded.append(adapter)

    def finished(self, req, now):
        pass

    def run(self):
        while self.events:
            t, _, fn, arg = heapq.heappop(self.events)
            fn(t, arg)


@pytest.mark.parametrize("fifo", [False, True])
def test_request_loads_pass_queued_prefetches_as_the_engine_and_fifo_loads_does_not(fifo, costs):
    loop = Loop()
    r = Replica(0, ReplicaConfig(loader_workers=1, fifo_loads=fifo), costs, np.random.default_rng(0), loop)
    for name in ("p1", "p2", "p3"):
        r.prefetch(name, 0.0)  # p1 loads, p2 and p3 queue
    r.add(SimRequest(0, "q", 8, 2, 0.0), 0.0)  # a request for an adapter nobody loaded
    r.add(SimRequest(1, "p3", 8, 2, 0.0), 0.0)  # a request for a queued prefetch
    loop.run()
    assert loop.loaded == (["p1", "p2", "p3", "q"] if fifo else ["p1", "q", "p3", "p2"])


def test_warm_where_resident_loads_ahead_exactly_where_the_old_weights_were(costs):
    m, sim = run("warm-resident", costs)
    ahead = {(p, k) for _, p, k, c in sim.new_loads if c == "prefetch"}
    assert ahead == {(p, revision_key(sim.names[a], 2)) for a, pods in sim.was_warm.items() for p in pods}
    assert m["first_cold_was_warm"] == 0  # no pod where the adapter was warm met it cold
