"""The per-tenant gauges (loraplex_tenant_*), read at scrape time from a real engine's scheduler."""
from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from loraplex.engine.api.metrics import Metrics
from loraplex.engine.core.async_engine import AsyncEngine
from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.llm_engine import LLMEngine
from loraplex.engine.core.sampling_params import SamplingParams
from tests.engine.api.conftest import metric, parse_metrics


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> LLMEngine:
    from bench.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tenant-metrics") / "llama", "llama")
    return LLMEngine(EngineConfig(model_id=str(path), device="cpu", num_kv_blocks=64, max_num_seqs=2,
                                  max_num_batched_tokens=64, max_model_len=64))


def test_tenant_gauges_follow_the_scheduler(engine):
    facade = AsyncEngine(engine)  # the HTTP layer's view of the engine (its threads are not started)
    metrics = Metrics(lambda: facade)

    def scrape() -> dict:
        return parse_metrics(generate_latest(metrics.registry).decode())

    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for i, (tenant, weight) in enumerate([("acme", 1.0), ("acme", 1.0), ("acme", 1.0), ("globex", 2.0)]):
        seq = engine.make_sequence(f"r{i}", [5, 6, 7, 8], params)
        seq.tenant, seq.tenant_weight = tenant, weight
        engine.add_sequence(seq)
    before = scrape()
    assert metric(before, "loraplex_tenant_requests_waiting", tenant="acme") == 3
    assert metric(before, "loraplex_tenant_requests_waiting", tenant="globex") == 1
    engine.step()  # two slots: acme's first request, then globex (the smaller counter once acme is charged)
    after = scrape()
    assert metric(after, "loraplex_tenant_requests_running", tenant="acme") == 1
    assert metric(after, "loraplex_tenant_requests_running", tenant="globex") == 1
    assert metric(after, "loraplex_tenant_requests_waiting", tenant="acme") == 2
    # 4 prompt tokens + 1 sampled token (x2), over the weight
    assert metric(after, "loraplex_tenant_virtual_service", tenant="acme") == 6.0
    assert metric(after, "loraplex_tenant_virtual_service", tenant="globex") == 3.0
    while engine.has_unfinished():
        engine.step()
    idle = scrape()
    assert not [k for k in idle if k[0].startswith("loraplex_tenant_")], "idle tenants keep no series"
