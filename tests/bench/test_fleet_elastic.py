"""The elastic fleet simulator: the auto-placement rule, scale-to-zero accounting and the shifting
workload, on tiny configurations.

No timings: the checks are the rules themselves (raise at once, cut only after the cool-down,
bounds, make before break), bookkeeping that holds whatever the costs are (GPU-hours are the
integral of the pods, the first request after zero waits at least a cold start), and the
workload's seeded properties.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.fleet_sim import cost as cost_model
from bench.fleet_sim.fleet import Pod, ScaleRule, fleet_accounting, simulate_elastic
from bench.fleet_sim.placement import Placement, PlacementRule, wanted
from bench.fleet_sim.policies import ELASTIC_POLICIES, make_policy
from bench.fleet_sim.replica import ReplicaConfig
from bench.fleet_sim.sim import adapter_name
from bench.fleet_sim.workload import FleetWorkload, Trace, epoch_of, generate, rankings

ROOT = Path(__file__).resolve().parents[2]
NAMES = [adapter_name(i) for i in range(6)]
AUTO = PlacementRule(mode="auto", min=1, max=3, target_rps=1.0, window_s=60.0, cooldown_s=300.0, interval_s=15.0)


@pytest.fixture(scope="module")
def costs():
    return cost_model.load()


def feed(p: Placement, adapter: int, rps: float, seconds: float, t0: float, warm=lambda a, pod: True,
         log: list | None = None) -> float:
    """`rps` requests/s for `adapter` over `seconds`, one operator pass every interval; `log` gets
    (time, wanted, count) after each pass."""
    t = t0
    while t < t0 + seconds - 1e-9:
        for _ in range(int(round(rps * p.rule.interval_s))):
            p.note_request(adapter)
        t += p.rule.interval_s
        p.evaluate(t, warm)
        if log is not None:
            log.append((t, int(wanted(p.rate, p.rule, len(p.pods))[adapter]), int(p.count[adapter])))
    return t


def test_wanted_is_clamped_to_min_max_and_the_pods_there_are():
    rule = PlacementRule(mode="auto", min=2, max=5, target_rps=0.5)
    assert wanted(np.array([0.0, 0.4, 1.1, 100.0]), rule, 10).tolist() == [2, 2, 3, 5]
    assert wanted(np.array([100.0]), rule, 4).tolist() == [4]  # never more pods than exist
    assert wanted(np.array([0.0]), rule, 1).tolist() == [1]  # min above the fleet: the fleet


def test_auto_placement_raises_at_once_and_cuts_only_after_the_cool_down():
    p = Placement(AUTO, NAMES)
    p.set_pods(list(range(5)), 0.0, lambda a, pod: True)
    assert p.count[0] == 1 and len(p.placed[0]) == 1
    log: list = []
    t = feed(p, 0, 2.6, 60.0, 0.0, log=log)  # 2.6 req/s over the 60 s window: ceil(2.6) = 3 pods
    assert log[-1] == (60.0, 3, 3) and len(p.placed[0]) == 3  # at the first pass that wants 3
    assert p.count[1] == 1  # the others stay at min
    t = feed(p, 0, 0.0, 180.0, t, log=log)  # idle: the window empties at once, the placement stays
    t = feed(p, 0, 3.0, 60.0, t, log=log)  # a second rise
    feed(p, 0, 0.0, 600.0, t, log=log)
    for i, (now, w, count) in enumerate(log):
        assert count >= w  # raised at once, never below what this pass wants
        window = [lw for lt, lw, _ in log[:i + 1] if now - lt < AUTO.cooldown_s]
        assert count >= max(window)  # never cut below what the last cool-down wanted
        before = log[i - 1][2] if i else 1
        if count < before:
            assert count == max(window)  # and cut to exactly that
    last3 = max(lt for lt, lw, _ in log if lw == 3)
    assert all(c == 3 for lt, _, c in log if last3 <= lt < last3 + AUTO.cooldown_s)
    assert log[-1][2] == 1 and len(p.placed[0]) == 1  # back to min at the end


def test_auto_placement_never_exceeds_max_nor_the_pods():
    p = Placement(AUTO, NAMES)
    p.set_pods([0, 1], 0.0, lambda a, pod: True)
    feed(p, 0, 50.0, 60.0, 0.0)
    assert p.count[0] == 2 and sorted(p.placed[0]) == [0, 1]  # max 3, but two pods
    p.set_pods(list(range(6)), 100.0, lambda a, pod: True)
    feed(p, 0, 50.0, 60.0, 100.0)
    assert p.count[0] == 3 and len(p.placed[0]) == 3


def test_a_placement_change_never_leaves_a_warm_adapter_cold_everywhere():
    """A new pod takes an adapter's only placement: the old pod keeps it until the new one is warm."""
    p = Placement(AUTO, NAMES)
    warm_on: dict[int, set[int]] = {a: set() for a in range(len(NAMES))}
    warm = lambda a, pod: pod in warm_on[a]  # noqa: E731
    p.set_pods([0, 1], 0.0, warm)
    for a in range(len(NAMES)):
        warm_on[a] = set(p.placed[a])  # each adapter warm where it is placed
    pods = [0, 1]
    moved = None
    for new in range(2, 40):  # add pods until some adapter's top choice moves to a new pod
        pods.append(new)
        before = {a: list(p.placed[a]) for a in range(len(NAMES))}
        p.set_pods(pods, float(new), warm)
        moved = next((a for a in range(len(NAMES)) if new in p.target[a] and not set(before[a]) & set(p.target[a])),
                     None)
        if moved is not None:
            break
    assert moved is not None
    old = before[moved]
    assert set(old) <= set(p.placed[moved]) and new in p.placed[moved]  # both, for now
    p.evaluate(1000.0, warm)
    assert set(old) <= set(p.placed[moved])  # the new pod is still cold: the old one stays
    warm_on[moved].add(new)
    p.evaluate(1015.0, warm)
    assert p.placed[moved] == p.target[moved] == [new]  # warm there now: the old one goes
    for a in range(len(NAMES)):
        assert any(warm(a, q) for q in p.placed[a])


def test_fixed_placement_moves_at_once_and_keeps_its_count():
    p = Placement(PlacementRule(mode="fixed", replicas=2), NAMES)
    p.set_pods([0, 1, 2, 3], 0.0, lambda a, pod: False)
    feed(p, 0, 20.0, 120.0, 0.0)
    assert all(len(p.placed[a]) == 2 for a in range(len(NAMES)))
    p.set_pods([0, 1], 200.0, lambda a, pod: True)
    assert all(sorted(p.placed[a]) == [0, 1] for a in range(len(NAMES)))


def test_gpu_hours_are_the_integral_of_the_pods():
    pods = [Pod(0, None, 0.0), Pod(1, None, 100.0, deleted=400.0), Pod(2, None, 350.0, deleted=500.0)]
    acc = fleet_accounting(pods, lo=50.0, hi=450.0)
    assert acc["gpu_hours"] == pytest.approx((400 + 300 + 100) / 3600)
    assert acc["mean_pods"] == pytest.approx(800 / 400)
    assert acc["peak_pods"] == 3


def one_request_trace(times: list[float], adapter: int = 0) -> Trace:
    n = len(times)
    return Trace(np.array(times), np.full(n, adapter), np.full(n, 16), np.full(n, 4))


def test_scale_to_zero_charges_the_cold_start_to_the_first_request(costs):
    """Two requests 1000 s apart: the fleet drains to zero after the idle period, and the second
    request waits at the gateway for a whole cold start."""
    spec = FleetWorkload(num_adapters=4, rate=0.01, duration_s=1200.0)
    trace = one_request_trace([5.0, 1000.0])
    scale = ScaleRule(mode="zero", replicas=2, idle_s=300.0, down_window_s=60.0, pod_start_s=30.0, model_load_s=2.5)
    m, sim = simulate_elastic(spec, trace, ReplicaConfig(device_slots=2, host_slots=4), scale, PlacementRule(),
                              make_policy("random", 2, 0), costs, strict=True, warmup_s=0.0)
    assert m["scale_to_zero"] == 1 and m["scale_from_zero"] == 1 and m["pods_created"] == 1
    first, second = sim.requests
    assert second.first_token - second.arrival >= scale.cold_start_s
    assert m["held_requests"] == 1 and m["held_max_s"] >= scale.cold_start_s
    assert first.first_token - first.arrival < scale.cold_start_s  # the first pod was up at t = 0
    # GPU-hours: pod 0 from 0 until the idle scale-down, pod 1 from the second arrival to the end
    p0, p1 = sim.pods
    assert p0.deleted is not None and 5.0 + 300.0 <= p0.deleted <= 5.0 + 300.0 + 2 * scale.interval_s
    assert p1.created == pytest.approx(1000.0) and p1.deleted is None
    assert m["gpu_hours"] == pytest.approx((p0.deleted + (1200.0 - 1000.0)) / 3600)


def test_a_waking_pod_loads_its_hottest_placed_adapters_before_it_serves(costs):
    spec = FleetWorkload(num_adapters=8, rate=0.1, duration_s=900.0)
    trace = one_request_trace([1.0, 2.0, 3.0, 700.0], adapter=3)
    scale = ScaleRule(mode="zero", replicas=1, idle_s=120.0, pod_start_s=10.0, model_load_s=1.0)
    m, sim = simulate_elastic(spec, trace, ReplicaConfig(device_slots=2, host_slots=4), scale, PlacementRule(),
                              make_policy("random", 1, 0), costs, strict=True, warmup_s=0.0)
    woke = sim.pods[1]
    assert adapter_name(3) in woke.replica.host or adapter_name(3) in woke.replica.slot_of
    assert m["cold_loads_per_s"] > 0
    last = sim.requests[-1]
    assert woke.ready_at > woke.created + scale.cold_start_s  # it loaded before Ready
    assert last.first_token >= woke.ready_at


@pytest.mark.parametrize("fleet", ["fixed", "hpa", "zero"])
@pytest.mark.parametrize("policy", ELASTIC_POLICIES)
def test_every_request_finishes_once_whatever_the_fleet_does(policy, fleet, costs):
    spec = FleetWorkload(num_adapters=60, rate=0.8, duration_s=600.0, diurnal_period_s=600.0, night_share=0.4,
                         shift_every_s=120.0, shift_top=10, seed=1)
    scale = ScaleRule(mode=fleet, replicas=3, target=2.0, idle_s=60.0, down_window_s=60.0, pod_start_s=5.0)
    for placement in ("fixed", "auto"):
        m, sim = simulate_elastic(spec, generate(spec), ReplicaConfig(device_slots=4, host_slots=8), scale,
                                  PlacementRule(mode=placement, target_rps=0.2), make_policy(policy, 3, 0), costs,
                                  strict=True, warmup_s=10.0, scrape_interval_s=0.5)
        assert m["peak_pods"] <= 3 and m["gpu_hours"] <= 3 * (600 - 10) / 3600 + 1e-9
        if fleet == "fixed":
            assert m["gpu_hours"] == pytest.approx(3 * (600 - 10) / 3600) and m["pods_created"] == 0
        if fleet == "zero":  # a 240 s night, 60 s idle: the fleet goes to zero
            assert m["scale_to_zero"] >= 1 and m["gpu_hours"] < 3 * (600 - 10) / 3600


def test_the_shifting_workload_is_seeded_and_deterministic():
    spec = FleetWorkload(num_adapters=500, rate=5.0, duration_s=1200.0, shift_every_s=300.0, shift_top=20,
                         diurnal_period_s=1200.0, night_rate=0.01, seed=4)
    a, b = generate(spec), generate(spec)
    for f in ("arrival", "adapter", "prompt_len", "output_len"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    c = generate(spec.scaled(seed=5))
    assert not np.array_equal(a.adapter[:100], c.adapter[:100])
    table = rankings(spec, 4)
    assert all(sorted(row.tolist()) == list(range(500)) for row in table)  # each epoch a permutation
    assert not np.array_equal(table[0, :20], table[1, :20])  # the hot set moved
    newcomers = set(table[1, :20]) - set(table[0, :20])
    assert newcomers and newcomers <= set(table[0, 20:])  # cold adapters became hot
    still = spec.scaled(shift_prob=0.0)
    assert all(np.array_equal(r, rankings(still, 4)[0]) for r in rankings(still, 4))
    # the shifts do not depend on the rate: every fleet size sees the same rankings
    assert np.array_equal(rankings(spec.scaled(rate=50.0), 4), table)


def test_the_diurnal_rate_has_a_quiet_night_and_keeps_its_mean():
    spec = FleetWorkload(num_adapters=100, rate=20.0, duration_s=3600.0, diurnal_period_s=3600.0, night_share=0.25,
                         night_rate=0.01, burst_factor=1.0, burst_share=0.5, seed=2)
    t = generate(spec).arrival
    assert np.all(np.diff(t) >= 0)
    night = t[t >= 0.75 * 3600]
    assert len(night) < 0.01 * 900 * 5  # only the trickle
    day = t[t < 0.75 * 3600]
    assert abs(len(day) / 3600 - 20.0) < 1.0  # the day carries the whole mean
    mid, edge = ((day > 1200) & (day < 1500)).sum(), (day < 300).sum()
    assert mid > 2 * edge  # a peak at midday
    assert epoch_of(np.array([0.0, 299.0, 301.0]), spec.scaled(shift_every_s=300.0)).tolist() == [0, 0, 1]


def test_quick_cli_writes_json_markdown_pngs_and_a_goal(tmp_path):
    out = tmp_path / "elastic"
    proc = subprocess.run([sys.executable, "-m", "bench.fleet_sim.elastic", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["strict"] is True
    combos = {(r["fleet"], r["placement"], r["policy"]) for r in result["runs"]}
    assert ("fixed", "fixed", "random") in combos and ("zero", "auto", "placed") in combos
    assert result["goal"]["met"] in (True, False)
    assert any(r["metrics"]["scale_to_zero"] > 0 for r in result["runs"] if r["fleet"] == "zero")
    md = (out / "results.md").read_text()
    assert "## The goal" in md and "| fleet | placement | policy |" in md
    for name in result["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
