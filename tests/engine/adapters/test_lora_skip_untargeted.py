"""A projection that no adapter of the batch targets runs no LoRA term (its slot weights are zero)."""
import dataclasses

from tests.engine.core.conftest import PROMPTS, prefill_in_one_forward
from tests.engine.adapters.conftest import make_engine, register_all, wait_for


def _forward_counting(engine, rows):
    calls = []
    ops = engine.runner.ops

    def counting(y, x, a, b, lb):
        calls.append(a.shape)
        return ops.add_lora(y, x, a, b, lb)

    prefill_in_one_forward(engine, rows, ops=dataclasses.replace(ops, add_lora=counting))
    return len(calls)


def test_lora_runs_only_on_targeted_projections(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]))
    register_all(engine, tiny_adapters["llama"])
    for name in ("qv-r4", "all-r16-rslora"):
        engine.adapters.request_load(name)
    wait_for(lambda: all(engine.adapters.get(n)["state"] == "host" for n in ("qv-r4", "all-r16-rslora")))
    layers = engine.model_config.num_layers
    # q_proj and v_proj only: 2 of the 7 projections per layer
    assert _forward_counting(engine, [(PROMPTS[0], "qv-r4"), (PROMPTS[1], None)]) == 2 * layers
    # with an all-module adapter in the same batch, every projection runs
    assert _forward_counting(engine, [(PROMPTS[0], "qv-r4"), (PROMPTS[2], "all-r16-rslora")]) == 7 * layers
