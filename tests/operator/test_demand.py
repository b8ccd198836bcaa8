"""Load-following placement (demand.py): the adapters' request counters, their rates over a
window (engine restarts included), and the warm-count decision with its hysteresis band and
cool-down."""
from __future__ import annotations

import pytest

from loraplex.operator import demand as D
from loraplex.operator.adapters import SpecProblem

METRICS = """\
# HELP loraplex_requests_total Requests by model (adapter or base) and status
# TYPE loraplex_requests_total counter
loraplex_requests_total{adapter="hot",status="200"} 40.0
loraplex_requests_total{adapter="hot",status="429"} 2.0
loraplex_requests_total{status="200",adapter="cold"} 1.0
loraplex_requests_total{adapter="other",status="200"} 500.0
loraplex_requests_total{adapter="unknown",status="404"} 7.0
loraplex_requests_total{adapter="restricted-0123456789ab",status="200"} 3.0
loraplex_request_duration_seconds_count{adapter="hot"} 40.0
loraplex_num_requests_running 2.0
"""


def policy(**kw) -> D.AutoPolicy:
    base = dict(min=1, max=8, target=2.0, window=60.0, down_delay=30.0)
    base.update(kw)
    return D.AutoPolicy(**base)


def test_adapter_counts_sum_statuses_and_leave_out_other_and_unknown():
    counts = D.adapter_counts(METRICS)
    assert counts == {"hot": 42.0, "cold": 1.0, "restricted-0123456789ab": 3.0}
    assert D.adapter_counts("") == {}


def test_rates_over_a_window_summed_over_pods():
    p0 = [D.Sample(0, {"a": 0}), D.Sample(10, {"a": 10}), D.Sample(20, {"a": 30, "b": 4})]
    p1 = [D.Sample(5, {"a": 100}), D.Sample(20, {"a": 130})]
    r = D.rates({"p0": p0, "p1": p1}, window=60, now=20)
    assert r["a"] == pytest.approx(30 / 20 + 30 / 15)
    assert r["b"] == pytest.approx(4 / 20)
    # The window keeps the last sample before it as the baseline: 20..40 only.
    r = D.rates({"p0": p0 + [D.Sample(40, {"a": 30})]}, window=15, now=40)
    assert r.get("a", 0) == 0.0
    assert D.rates({"p0": p0[:1]}, 60, 0) == {}, "one sample is no rate"


def test_a_counter_that_went_down_is_an_engine_restart():
    s = [D.Sample(0, {"a": 50}), D.Sample(10, {"a": 60}), D.Sample(20, {"a": 5})]
    assert D.pod_rate(s, "a", 60, 20) == pytest.approx((10 + 5) / 20)


def test_up_at_once_down_only_after_the_delay_and_below_the_band():
    p = policy()                                           # target 2/pod, band at 0.7 x 2 = 1.4/pod
    w = D.decide(1, 7.0, p, None, now=0)
    assert w.count == 4 and w.reason == "4 pods: 7 req/s over 60 s, target 2/pod"
    w = D.decide(4, 5.0, p, w, now=10)                     # ceil(5/2)=3 but ceil(5/1.4)=4: inside the band
    assert w.count == 4 and w.low_since is None
    w = D.decide(4, 2.5, p, w, now=20)                     # ceil(2.5/1.4)=2 < 4: the cool-down starts
    assert w.count == 4 and w.low_since == 20 and "; 2 once below 0.7 x target for 30 s" in w.reason
    w = D.decide(4, 2.5, p, w, now=49)
    assert w.count == 4
    w = D.decide(4, 2.5, p, w, now=50)                     # low for the whole delay
    assert w.count == 2 and w.low_since is None
    w = D.decide(2, 0.0, p, w, now=60)
    assert w.count == 2 and w.low_since == 60
    again = D.decide(2, 9.0, p, w, now=70)                 # hot again: up at once, cool-down forgotten
    assert again.count == 5 and again.low_since is None


def test_bounds_unknowns_and_no_metrics():
    p = policy(min=2, max=3)
    assert D.decide(None, None, p, None, 0).count == 2, "a new adapter starts at min"
    assert D.decide(6, None, p, None, 0).count == 3, "no rate yet: held inside [min, max]"
    assert "no request rate measured yet" in D.decide(2, None, p, None, 0).reason
    assert D.decide(2, 100.0, p, None, 0).count == 3
    assert D.decide(3, 0.0, policy(min=2, max=3, down_delay=0), None, 0).count == 2


def test_auto_policy_from_spec_and_its_problems():
    assert D.AutoPolicy.from_spec({}) == D.AutoPolicy(1, 8, 1.0, 60.0, 120.0)
    p = D.AutoPolicy.from_spec({"min": 2, "max": 5, "targetRequestsPerPod": 1.5, "rateWindowSeconds": 30,
                                "scaleDownDelaySeconds": 0})
    assert (p.min, p.max, p.target, p.window, p.down_delay) == (2, 5, 1.5, 30, 0)
    for bad, words in (({"min": 5, "max": 2}, "placement.min (5) must be <= placement.max (2)"),
                       ({"min": 0}, "placement.min must be an integer in [1, 1000]"),
                       ({"max": "many"}, "placement.max must be an integer"),
                       ({"targetRequestsPerPod": 0}, "placement.targetRequestsPerPod must be a number"),
                       ({"rateWindowSeconds": 1}, "placement.rateWindowSeconds"),
                       ({"min": 1.5}, "placement.min must be an integer")):
        with pytest.raises(SpecProblem) as e:
            D.AutoPolicy.from_spec(bad)
        assert e.value.reason == "InvalidPlacement" and words in e.value.message, (bad, e.value.message)


def test_state_records_samples_forgets_gone_pods_and_reads_by_base():
    rates = D.AdapterRates()
    bd = rates.base("ns", "b")
    bd.record({"p0": {"a": 0}, "p1": {"a": 0}}, now=0, keep_seconds=60, live=["p0", "p1"])
    assert bd.rate("a", 60, 0) is None, "no rate before two samples"
    bd.record({"p0": {"a": 30}, "p1": {"a": 10}}, now=10, keep_seconds=60, live=["p0", "p1"])
    assert rates.of_base("ns", "b") == {"a": pytest.approx(4.0)}
    assert rates.rate("ns", "b", "a") == pytest.approx(4.0) and rates.rate("ns", "b", "x") == 0.0
    bd.record({"p0": {"a": 40}}, now=20, keep_seconds=60, live=["p0"])  # p1 is gone
    assert set(bd.samples) == {"p0"}
    bd.record({"p0": {"a": 40}}, now=200, keep_seconds=60, live=["p0"])
    assert len(bd.samples["p0"]) == 2, "only what a window needs is kept"
    assert rates.of_base("other", "b") == {} and rates.warmth("ns", "b", "a") is None
    rates.forget("ns", "b")
    assert rates.of_base("ns", "b") == {}


class _Rt:
    def __init__(self) -> None:
        self.adapter_rates = D.AdapterRates()


def _metrics(**counts: float) -> str:
    return "".join(f'loraplex_requests_total{{adapter="{a}",status="200"}} {n}\n' for a, n in counts.items())


def _hot(status: dict | None = None) -> dict:
    return {"name": "hot", "spec": {"placement": {"replicas": "auto", "max": 3, "rateWindowSeconds": 10,
                                                  "scaleDownDelaySeconds": 0}}, "status": status or {}}


def test_the_timer_decides_and_keeps_the_reason_while_the_count_stays():
    """scaling.follow_demand: the counters of every pod into the rates, the decision per auto
    adapter, and a reason rewritten only when the count (or the measurement) changes it."""
    from loraplex.operator.scaling import follow_demand

    rt, base = _Rt(), {"metadata": {"namespace": "ns", "name": "b"}, "spec": {}}
    assert follow_demand(rt, base, [_hot()], {"p0": _metrics(hot=0)}, ["p0"], now=0), "a first decision"
    w0 = rt.adapter_rates.warmth("ns", "b", "hot")
    assert w0.count == 1 and not w0.measured
    assert follow_demand(rt, base, [_hot()], {"p0": _metrics(hot=25)}, ["p0"], now=10), "2.5 req/s: 3 pods"
    w1 = rt.adapter_rates.warmth("ns", "b", "hot")
    assert w1.count == 3 and w1.reason == "3 pods: 2.5 req/s over 10 s, target 1/pod"
    assert not follow_demand(rt, base, [_hot()], {"p0": _metrics(hot=52)}, ["p0"], now=20)
    assert rt.adapter_rates.warmth("ns", "b", "hot").reason == w1.reason, "same count: the reason stays"
    assert rt.adapter_rates.rate("ns", "b", "hot") > 2
    # A fresh operator keeps the reason its status gives while the count stays.
    said = {"placement": ["p0", "p1", "p2"], "placementReason": w1.reason}
    fresh = _Rt()
    follow_demand(fresh, base, [_hot(said)], {"p0": _metrics(hot=0)}, ["p0"], now=0)
    assert fresh.adapter_rates.warmth("ns", "b", "hot").reason == w1.reason
    follow_demand(fresh, base, [_hot(said)], {"p0": _metrics(hot=30)}, ["p0"], now=10)
    assert fresh.adapter_rates.warmth("ns", "b", "hot").reason == w1.reason
    # A bad placement is the pass's to report: the timer leaves it out.
    bad = {"name": "bad", "spec": {"placement": {"replicas": "auto", "min": 4, "max": 2}}}
    follow_demand(rt, base, [_hot(), bad], {"p0": _metrics(hot=52)}, ["p0"], now=30)
    assert rt.adapter_rates.warmth("ns", "b", "bad") is None
