"""The fleet simulator: its CLI end to end, its invariants, and the policies' scoring rules.

Timings are never checked: the simulated numbers depend only on the committed cost data and
the seed, and these tests check properties that hold whatever those numbers are. "Affinity
never has fewer warm hits than random" is not among them: it is not guaranteed (an affinity
policy can pile a hot adapter's bursts on one replica and evict the rest there), so the tests
check what is: conservation, the slot cache's invariants, routing being moot on one replica, an
unbounded hash ring pinning each adapter to one replica.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.fleet_sim import cost as cost_model
from bench.fleet_sim.policies import POLICIES, ChwblPolicy, GiePolicy, PodView, lora_affinity_score, make_policy
from bench.fleet_sim.replica import ReplicaConfig
from bench.fleet_sim.sim import FleetConfig, Simulation, simulate
from bench.fleet_sim.validate import parse_metrics
from bench.fleet_sim.workload import FleetWorkload, generate, summary

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPEC = FleetWorkload(num_adapters=200, rate=8.0, duration_s=40.0, seed=3)
FLEET = FleetConfig(replicas=4, replica=ReplicaConfig(device_slots=4, host_slots=12), warmup_s=5.0)


@pytest.fixture(scope="module")
def costs():
    return cost_model.load()


def test_quick_cli_checks_invariants_and_writes_json_markdown_pngs(tmp_path):
    out = tmp_path / "fleet"
    proc = subprocess.run([sys.executable, "-m", "bench.fleet_sim", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["strict"] is True  # --quick checks every invariant while it runs
    assert {(r["replicas"], r["policy"]) for r in result["runs"]} == {(n, p) for n in (1, 2, 4) for p in POLICIES}
    for r in result["runs"]:
        m = r["metrics"]
        assert m["requests_in_window"] > 0 and m["errors"] == 0
        assert 0 <= m["warm_hit_rate"] <= 1 and 0 < m["ttft_p50_s"] <= m["ttft_p99_s"]
    md = (out / "results.md").read_text()
    assert "| policy | req/s |" in md and "## Which policy wins" in md
    assert set(result["plots"]) == {"policies_vs_replicas.png", "step_cost_fit.png"}
    for name in result["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name


@pytest.mark.parametrize("fairness", [None, 0.0])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_finishes_once_and_slots_hold(policy, fairness, costs):
    """strict mode checks the slot cache at every step (adapters <= slots, pins == running, every
    batch row's adapter in a slot, caps) and conservation at the end; it raises on a breach.
    With the slot-fairness rule on, nothing starves either."""
    trace = generate(SPEC)
    fleet = FleetConfig(replicas=4, replica=ReplicaConfig(device_slots=4, host_slots=12, adapter_fairness_s=fairness),
                        warmup_s=5.0)
    sim = Simulation(trace, SPEC, fleet, make_policy(policy, FLEET.replicas, 0), costs, strict=True)
    m = sim.run()
    assert m["requests_in_window"] > 0
    assert sum(r.disk_loads for r in sim.replicas) == len(sim.loads["disk"])
    # the conservation check is live: a request counted twice is caught
    sim.finish_count[0] += 1
    with pytest.raises(AssertionError, match="exactly once"):
        sim.check_end()


def test_slot_check_catches_a_batch_row_without_a_slot(costs):
    trace = generate(SPEC)
    sim = Simulation(trace, SPEC, FLEET, make_policy("random", FLEET.replicas, 0), costs, strict=True)
    rep = sim.replicas[0]
    original, leaked = rep._acquire, []

    def leaky(req, now):  # admits one request without giving its adapter a slot
        if not leaked and req.adapter not in rep.slot_of:
            leaked.append(req)
            return True
        return original(req, now)

    rep._acquire = leaky
    with pytest.raises(AssertionError, match="replica 0"):
        sim.run()
    assert leaked


def test_one_replica_makes_routing_moot(costs):
    """With one replica every policy must give the same numbers: routing draws nothing from the
    replicas' random streams."""
    spec = SPEC.scaled(rate=2.0)
    trace = generate(spec)
    fleet = FleetConfig(replicas=1, replica=FLEET.replica, warmup_s=5.0)
    results = [simulate(spec, trace, fleet, make_policy(p, 1, 0), costs) for p in POLICIES]
    keys = ("ttft_p50_s", "ttft_p99_s", "throughput_tok_s", "warm_hit_rate", "cold_loads_per_s")
    for r in results[1:]:
        assert {k: r[k] for k in keys} == {k: results[0][k] for k in keys}


def test_hashing_without_a_load_bound_keeps_each_adapter_on_one_replica(costs):
    """An unbounded ring sends an adapter to one replica only; with room for every adapter in host
    RAM no adapter is then read from disk twice, fleet-wide."""
    trace = generate(SPEC)
    fleet = FleetConfig(replicas=4, replica=ReplicaConfig(device_slots=4, host_slots=1000), warmup_s=5.0)
    sim = Simulation(trace, SPEC, fleet, ChwblPolicy(4, load_factor=1e9), costs, strict=True)
    sim.run()
    where: dict[str, set] = {}
    for q in sim.requests:
        where.setdefault(q.adapter, set()).add(q.replica)
    assert all(len(r) == 1 for r in where.values())
    assert len(sim.loads["disk"]) == len(where)
    # a bounded ring spreads a hot adapter over several replicas
    sim = Simulation(trace, SPEC, fleet, ChwblPolicy(4, load_factor=1.0), costs)
    sim.run()
    hot = max(where, key=lambda a: sum(q.adapter == a for q in sim.requests))
    assert len({q.replica for q in sim.requests if q.adapter == hot}) > 1


def test_lora_affinity_scorer_cases_follow_the_epp():
    # lora_affinity.go: active 1.0 > room to load 0.8 > waiting 0.6 > full 0
    assert lora_affinity_score("a", frozenset({"a", "b"}), frozenset(), 2) == 1.0
    assert lora_affinity_score("a", frozenset({"b"}), frozenset(), 2) == 0.8
    assert lora_affinity_score("a", frozenset({"b"}), frozenset({"a"}), 2) == 0.6
    assert lora_affinity_score("a", frozenset({"b", "c"}), frozenset(), 2) == 0.0
    g = GiePolicy(random.Random(0))
    views = [PodView(waiting=4, kv_usage=0.5), PodView(waiting=0, kv_usage=0.5), PodView(waiting=2, kv_usage=0.0)]
    # queue: (max - q) / (max - min) -> 0, 1, 0.5; kv: 1 - usage; lora 0.8 each (room): weights 2, 2, 1
    assert g.scores("x", views) == pytest.approx([0 + 1.0 + 0.8, 2 + 1.0 + 0.8, 1 + 2.0 + 0.8])
    assert g.pick("x", views) == 2
    same = [PodView(waiting=3), PodView(waiting=3)]
    assert g.scores("x", same) == pytest.approx([2 + 2 + 0.8] * 2)  # equal queues all score 1.0
    resident = GiePolicy(random.Random(0), resident=True)
    full = [PodView(resident_adapters=frozenset(f"r{i}" for i in range(8))),
            PodView(resident_adapters=frozenset({"x", *(f"r{i}" for i in range(7))}))]
    assert resident.pick("x", full) == 1


def test_workload_has_zipf_popularity_and_bursts():
    spec = FleetWorkload(num_adapters=10_000, rate=10.0, duration_s=5000.0, seed=1)
    trace = generate(spec)
    s = summary(trace, spec)
    assert abs(s["mean_rate"] - 10.0) / 10.0 < 0.1
    harmonic = (1.0 / np.arange(1, 10_001)).sum()
    assert abs(s["top_adapter_share"] - 1 / harmonic) < 0.02  # Zipf s=1: the top adapter's share is 1/H_n
    assert s["interarrival_cv"] > 1.1  # burstier than Poisson
    flat = generate(spec.scaled(burst_factor=1.0))
    assert abs(summary(flat, spec)["interarrival_cv"] - 1.0) < 0.05
    assert np.all(np.diff(trace.arrival) >= 0)


def test_cost_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(200):
        b, p, d = int(rng.integers(1, 33)), int(rng.choice([0, 64, 256])), int(rng.integers(0, 9))
        rows.append([b, b, p, d, 0.02 + 0.003 * b + 0.0004 * p + 0.005 * d])
    c = cost_model.fit({"columns": ["rows", "decode_rows", "prefill_tokens", "distinct_adapters", "seconds"],
                        "step_samples": rows, "disk_to_host_seconds": [0.01, 0.02], "host_to_device_seconds": [0.001]})
    assert (c.c0, c.c_row, c.c_token, c.c_adapter) == pytest.approx((0.02, 0.003, 0.0004, 0.005), rel=1e-6)
    assert c.fit["r2"] == pytest.approx(1.0)
    slow = c.with_disk_loads_scaled(20)
    assert slow.disk_load_s == pytest.approx((0.2, 0.4)) and slow.c0 == c.c0
    assert c.scaled(2).step_seconds(4, 10, 2) == pytest.approx(2 * c.step_seconds(4, 10, 2))


def test_committed_cost_data_fits_the_engine(costs):
    assert costs.fit["samples"] >= 100 and costs.fit["r2"] > 0.5
    assert costs.c0 > 0 and costs.step_seconds(32, 0, 8) > costs.step_seconds(1, 0, 0)
    assert len(costs.disk_load_s) >= 10 and costs.h2d_s > 0


def test_router_reads_engine_metrics():
    text = "\n".join([
        "# TYPE loraplex_num_requests_waiting gauge", "loraplex_num_requests_waiting 3.0",
        "# TYPE loraplex_kv_cache_usage_ratio gauge", "loraplex_kv_cache_usage_ratio 0.25",
        "# TYPE loraplex_adapter_loads counter",
        'loraplex_adapter_loads_total{result="ok",tier="disk"} 7.0',
        'loraplex_adapter_loads_total{result="ok",tier="device"} 9.0',
        'loraplex_adapter_loads_total{result="error",tier="disk"} 2.0',
        "# TYPE vllm:lora_requests_info gauge",
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e9',
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a",waiting_lora_adapters="c"} 1.6e9', ""])
    m = parse_metrics(text)
    assert (m["waiting"], m["kv_usage"], m["disk_loads"], m["device_loads"]) == (3, 0.25, 7, 9)
    assert m["lora_info"][1:] == (frozenset({"a", "b"}), frozenset(), 4)


@pytest.mark.slow
def test_loopback_validation_runs_real_engines_with_the_sim_policy(tmp_path):
    """The validation pipeline end to end on the tiny model: two real engines on 127.0.0.2/.3,
    routed by the simulator's policy code from their /metrics and /v1/adapters, then simulated."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fleet_sim.validate", "--tiny", "--engines", "2", "--adapters", "6",
         "--device-slots", "2", "--host-slots", "3", "--rate", "4", "--duration", "8", "--warmup", "2",
         "--scrape-interval", "0.1", "--policies", "gie-resident", "--cache-dir", str(tmp_path / "cache"),
         "--work", str(tmp_path / "work"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "validation.json").read_text())
    run = result["runs"][0]
    assert run["policy"] == "gie-resident" and result["meta"]["tiny"] is True
    real, sim = run["real"], run["sim"]
    assert real["errors"] == 0 and real["requests_in_window"] == sim["requests_in_window"] > 0
    # six adapters on engines of two slots: loads happened, and the scrapes saw them
    assert real["cold_loads_per_s"] > 0 and 0 <= real["warm_hit_rate"] < 1
    assert set(run["error"]) >= {"ttft_p50_s", "ttft_p99_s", "throughput_req_s", "warm_hit_rate"}
    assert "| gie-resident | real |" in (out / "validation.md").read_text()
