"""--dynamic-adapters: who resolves unregistered names (the HTTP side is test_catalog*.py)."""
import pytest

from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.errors import UnknownAdapterError
from tests.engine.adapters.conftest import make_engine


def test_policy_defaults_follow_the_source():
    assert EngineConfig(model_id="m", adapter_source="local").dynamic_adapter_policy() == "on"
    assert EngineConfig(model_id="m", adapter_source="hub").dynamic_adapter_policy() == "off"
    assert EngineConfig(model_id="m", adapter_source="s3").dynamic_adapter_policy() == "off"
    assert EngineConfig(model_id="m", adapter_source="s3", dynamic_adapters="on").dynamic_adapter_policy() == "on"
    with pytest.raises(ValueError, match="--dynamic-adapters"):
        EngineConfig(model_id="m", dynamic_adapters="maybe").dynamic_adapter_policy()


def test_off_resolves_nothing_and_on_resolves_a_folder(tiny_models, tiny_adapters):
    off = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), dynamic_adapters="off")
    with pytest.raises(UnknownAdapterError):
        off.adapters.resolve("qv-r4").result(timeout=30)
    assert off.adapters.resolver.lookups == 0  # not even looked up
    on = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]),
                     adapter_memory_fraction=0.5)  # half the RAM: room for the 4 slots asked for
    assert on.adapters.num_slots == 4
    assert on.adapters.resolve("qv-r4").result(timeout=30) == "qv-r4"
    assert on.adapters.get("qv-r4")["dynamic"] is True
    no_dir = make_engine(tiny_models["llama"])  # local source without --adapter-dir: nothing to resolve from
    assert no_dir.adapters.dynamic == "off"
