"""The revisions' health counters the rollout analysis reads (revisionhealth.py): parsed from the
exposition text prometheus_client writes for the engine's per-revision metrics, summed over the
base's Ready pods, and forgotten with the pods."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from loraplex.operator.revisionhealth import RevisionCounters, is_error, parse
from loraplex.operator.traffic import RevisionHealth


def engine_metrics(requests: dict[tuple[str, int, str], int], ttfts: dict[tuple[str, int], list[float]]) -> str:
    """/metrics of an engine that served `requests` ((adapter, revision, status) -> count) and
    observed `ttfts`, with the engine's metric names, plus the series a rollout must ignore."""
    r = CollectorRegistry()
    req = Counter("loraplex_revision_requests", "Requests by adapter revision", ["adapter", "revision", "status"],
                  registry=r)
    ttft = Histogram("loraplex_revision_time_to_first_token_seconds", "TTFT by adapter revision",
                     ["adapter", "revision"], buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r)
    plain = Counter("loraplex_requests", "Requests by adapter", ["adapter", "status"], registry=r)
    for (a, n, status), count in requests.items():
        req.labels(adapter=a, revision=str(n), status=status).inc(count)
        plain.labels(adapter=a, status=status).inc(count)
    for (a, n), values in ttfts.items():
        for v in values:
            ttft.labels(adapter=a, revision=str(n)).observe(v)
    return generate_latest(r).decode()


def test_parse_counts_errors_and_ttft_per_revision():
    text = engine_metrics({("support", 1, "200"): 90, ("support", 1, "500"): 3, ("support", 1, "424"): 2,
                           ("support", 1, "429"): 4, ("support", 1, "400"): 1, ("support", 2, "200"): 10,
                           ("support", 2, "503"): 1, ("other", 1, "200"): 7, ("sql", 3, "200"): 5},
                          {("support", 1): [0.1] * 4 + [0.3], ("support", 2): [0.5, 0.7]})
    assert "loraplex_revision_requests_total{" in text
    # *_created series (absent when the engine's process turned them off, as it does) are not counts
    text += 'loraplex_revision_requests_created{adapter="support",revision="1",status="200"} 1.7e+09\n'
    got = parse(text)
    assert set(got) == {"support", "sql"}, "`other` (the engine's capped label) names no adapter"
    s1 = got["support"][1]
    assert (s1.requests, s1.errors) == (100, 5), "5xx and 424 are errors; 400 and 429 are the client's"
    assert s1.ttft_count == 5 and abs(s1.ttft_sum - 0.7) < 1e-9
    s2 = got["support"][2]
    assert (s2.requests, s2.errors, s2.ttft_count) == (11, 1, 2) and abs(s2.ttft_sum - 1.2) < 1e-9
    assert got["sql"] == {3: RevisionHealth(5, 0, 0, 0)}


def test_parse_ignores_malformed_and_foreign_series():
    text = "\n".join([
        '# HELP loraplex_revision_requests_total x',
        'loraplex_revision_requests_total{adapter="a",revision="x",status="200"} 5',
        'loraplex_revision_requests_total{adapter="a",revision="0",status="200"} 5',
        'loraplex_revision_requests_total{revision="1",status="200"} 5',
        'loraplex_revision_requests_total{adapter="a",revision="1",status="200"} NaN',
        'loraplex_revision_requests_total{adapter="a",revision="1",status="200"} nope',
        'loraplex_revision_requests_totalx{adapter="a",revision="1",status="200"} 5',
        'loraplex_revision_requests_total{adapter="a",revision="2",status="500"} 3 1700000000000',
    ])
    assert parse(text) == {"a": {2: RevisionHealth(3, 3, 0, 0)}}
    assert is_error("502") and is_error("424") and not is_error("429") and not is_error("200")


def test_health_is_summed_over_the_ready_pods_and_forgets_the_others():
    store = RevisionCounters()
    a = engine_metrics({("support", 1, "200"): 10, ("support", 2, "500"): 1}, {("support", 1): [0.2]})
    b = engine_metrics({("support", 1, "200"): 5}, {("support", 1): [0.4]})
    store.record("ns", "base", {"pod-a": a, "pod-b": b}, ready=["pod-a", "pod-b"])
    got = store.revision_health("ns", "base", "support")
    assert got[1].requests == 15 and got[1].ttft_count == 2 and abs(got[1].ttft_sum - 0.6) < 1e-9
    assert got[2] == RevisionHealth(1, 1, 0, 0)
    # pod-b Ready but its scrape failed this time: its last counters stay in the sum.
    store.record("ns", "base", {"pod-a": a}, ready=["pod-a", "pod-b"])
    assert store.revision_health("ns", "base", "support")[1].requests == 15
    # pod-b is no longer Ready: forgotten; a text of a pod not Ready is not recorded.
    store.record("ns", "base", {"pod-a": a, "pod-c": b}, ready=["pod-a"])
    assert store.revision_health("ns", "base", "support")[1].requests == 10
    assert set(store.bases[next(iter(store.bases))]) == {"pod-a"}
    assert store.revision_health("ns", "base", "absent") == {} and store.revision_health("ns", "other", "x") == {}
    store.forget("ns", "base")
    assert store.bases == {}


def test_the_base_timer_records_the_ready_pods_counters():
    """scaling.observe_base, the timer's one read of every Ready pod's /metrics, feeds the store
    (the same read as the autoscaler and the adapters' rates)."""
    import asyncio

    from loraplex.operator import demand
    from loraplex.operator.scaling import ScaleMemory, observe_base
    from loraplex.operator.status import PodView

    texts = {"10.0.0.1": engine_metrics({("support", 2, "200"): 8}, {("support", 2): [0.1] * 8}),
             "10.0.0.2": engine_metrics({("support", 2, "500"): 2}, {})}

    class Engine:
        async def metrics(self, ip, port, token):
            return texts[ip]

    class Rt:
        engine, scaling = Engine(), ScaleMemory()
        adapter_rates, revision_counters = demand.AdapterRates(), RevisionCounters()

        async def get_secret(self, namespace, name):
            return None

    rt = Rt()
    base = {"metadata": {"namespace": "ns", "name": "b"}, "spec": {}}
    pods = [PodView("p1", "u1", "10.0.0.1", 8000, True), PodView("p2", "u2", "10.0.0.2", 8000, True),
            PodView("p3", "u3", "10.0.0.3", 8000, False)]
    asyncio.run(observe_base(rt, base, pods, [], now=0))
    (got,) = rt.revision_counters.revision_health("ns", "b", "support").items()
    assert got[0] == 2 and (got[1].requests, got[1].errors, got[1].ttft_count) == (10, 2, 8)
    assert abs(got[1].ttft_sum - 0.8) < 1e-9
    assert set(rt.revision_counters.bases[next(iter(rt.revision_counters.bases))]) == {"p1", "p2"}
    asyncio.run(observe_base(rt, {**base, "metadata": {**base["metadata"], "deletionTimestamp": "x"}}, pods, []))
    assert rt.revision_counters.bases == {}
