import time

import pytest
import torch

from loraplex.manifest import AdapterManifest
from tests.engine.core.conftest import make_engine  # noqa: F401  (re-exported for the tests here)
from bench.tiny import ALL_MODULES, make_tiny_adapter

# Four adapters that differ in every way PEFT lets them: rank, targets, alpha, rslora,
# per-module rank and alpha patterns, and layers.
ADAPTER_SPECS = {
    "qv-r4": dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=11),
    "all-r16-rslora": dict(rank=16, alpha=32, target_modules=ALL_MODULES, use_rslora=True, seed=12),
    "patterns-r8": dict(rank=8, alpha=16, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"], seed=13,
                        rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 4}),
    "mlp-layer1-r2": dict(rank=2, alpha=2, target_modules=["up_proj", "down_proj"], seed=14, layers_to_transform=[1]),
}


@pytest.fixture(scope="session")
def tiny_adapters(tiny_models, tmp_path_factory):
    """{family: adapter root with one folder per ADAPTER_SPECS entry}."""
    roots = {}
    for family in ("llama", "qwen2"):
        root = tmp_path_factory.mktemp(f"adapters-{family}")
        for name, spec in ADAPTER_SPECS.items():
            make_tiny_adapter(tiny_models[family], root / name, **spec)
        roots[family] = root
    return roots


def register_all(engine, root, names=None, **manifest_fields):
    for name in names or ADAPTER_SPECS:
        engine.adapters.register(AdapterManifest(name=name, uri=str(root / name), **manifest_fields))


def states(engine) -> dict[str, str]:
    return {a["name"]: a["state"] for a in engine.adapters.list()}


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="session")
def peft_models(tiny_models, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(family, adapter):
        key = (family, adapter)
        if key not in cache:
            base = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32)
            cache[key] = base.eval() if adapter is None else PeftModel.from_pretrained(base, tiny_adapters[family] / adapter).eval()
        return cache[key]

    return get
