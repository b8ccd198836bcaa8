"""The autoscaling decision (pure) and the metrics parsing."""
from __future__ import annotations

from loraplex.operator.autoscale import Policy, decide, parse_metric, recommend

METRICS = """\
# HELP loraplex_num_requests_running Requests in the running batch.
# TYPE loraplex_num_requests_running gauge
loraplex_num_requests_running 6.0
loraplex_num_requests_waiting{priority="high"} 2
loraplex_num_requests_waiting{priority="low"} 3
loraplex_kv_cache_usage_ratio 0.75
loraplex_requests_total{adapter="a",status="ok"} 12 1700000000000
"""


def policy(**kw) -> Policy:
    base = dict(min_replicas=1, max_replicas=10, metric="num_requests_running", target=4.0,
                up_window=0, down_window=60)
    base.update(kw)
    return Policy(**base)


def test_parse_metric():
    assert parse_metric(METRICS, "loraplex_num_requests_running") == 6.0
    assert parse_metric(METRICS, "loraplex_num_requests_waiting") == 5.0, "series are summed"
    assert parse_metric(METRICS, "loraplex_kv_cache_usage_ratio") == 0.75
    assert parse_metric(METRICS, "loraplex_requests") is None
    assert parse_metric("", "loraplex_num_requests_running") is None


def test_recommend_hpa_formula():
    assert recommend(2, [8, 8], 4) == 4
    assert recommend(2, [4.2, 3.9], 4) == 2, "inside the 10% tolerance: stay"
    assert recommend(4, [1, 1, 0, 0], 4) == 1
    assert recommend(3, [], 4) is None


def test_scale_up_immediately_with_no_up_window():
    d = decide(2, [8, 8], policy(), (), now=100)
    assert d.desired == 4 and d.recommendation == 4


def test_scale_down_waits_for_the_down_window():
    p = policy(down_window=60)
    hist = ()
    d = decide(4, [8, 8, 8, 8], p, hist, now=0)          # busy: recommendation 8
    assert d.desired == 8
    d = decide(8, [0] * 8, p, d.history, now=10)          # idle now, but the window holds 8
    assert d.desired == 8 and d.recommendation == 0
    d = decide(8, [0] * 8, p, d.history, now=59)
    assert d.desired == 8
    d = decide(8, [0] * 8, p, d.history, now=71)          # the busy sample left the window
    assert d.desired == 1


def test_scale_up_window_needs_sustained_load():
    p = policy(up_window=30, down_window=0)
    d = decide(2, [2, 2], p, (), now=0)                   # recommendation 1 -> would go down
    assert d.desired == 1
    d = decide(2, [8, 8], p, ((0, 2),), now=10)           # a spike: the window still holds 2
    assert d.desired == 2
    d = decide(2, [8, 8], p, d.history, now=45)           # sustained past the window
    assert d.desired == 4


def test_bounds_and_no_metrics():
    assert decide(2, [100, 100], policy(max_replicas=5), (), now=0).desired == 5
    assert decide(3, [0, 0, 0], policy(min_replicas=2, down_window=0), (), now=0).desired == 2
    d = decide(3, [], policy(), (), now=0)
    assert d.desired == 3 and d.recommendation is None
    assert decide(9, [], policy(max_replicas=4), (), now=0).desired == 4, "held inside [min, max]"


def test_history_is_pruned():
    p = policy(up_window=10, down_window=20)
    hist = tuple((t, 5) for t in range(0, 100, 5))
    d = decide(5, [20] * 5, p, hist, now=100)
    assert all(100 - t <= 20 for t, _ in d.history)


def test_kv_cache_ratio():
    p = policy(metric="kv_cache_usage_ratio", target=0.5, down_window=0)
    assert decide(2, [0.9, 0.9], p, (), now=0).desired == 4
    assert decide(4, [0.1, 0.1, 0.1, 0.1], p, (), now=0).desired == 1
