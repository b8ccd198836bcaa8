"""A projection that no adapter of the batch targets runs no LoRA expand (its slot weights are zero);
projections that share an input share one shrink."""
import dataclasses

from tests.engine.core.conftest import PROMPTS, prefill_in_one_forward
from tests.engine.adapters.conftest import make_engine, register_all, wait_for


def _forward_counting(engine, rows):
    """(group shrinks, projection expands) of one forward."""
    shrinks, expands = [], []
    ops = engine.runner.ops

    def shrink(x, slots, lb):
        shrinks.append(slots)
        return ops.lora_shrink(x, slots, lb)

    def expand(y, h, slots, p, lb):
        assert slots is shrinks[-1]  # right after its own group's shrink
        expands.append(p)
        return ops.lora_expand(y, h, slots, p, lb)

    prefill_in_one_forward(engine, rows, ops=dataclasses.replace(ops, lora_shrink=shrink, lora_expand=expand))
    return len(shrinks), len(expands)


def test_lora_runs_only_on_targeted_projections(tiny_models, tiny_adapters):
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]))
    register_all(engine, tiny_adapters["llama"])
    for name in ("qv-r4", "all-r16-rslora"):
        engine.adapters.request_load(name)
    wait_for(lambda: all(engine.adapters.get(n)["state"] == "host" for n in ("qv-r4", "all-r16-rslora")))
    layers = engine.model_config.num_layers
    # q_proj and v_proj only: one q/k/v group call per layer, expanding 2 of its 3 slices
    assert _forward_counting(engine, [(PROMPTS[0], "qv-r4"), (PROMPTS[1], None)]) == (layers, 2 * layers)
    # with an all-module adapter in the same batch, every group runs (q/k/v, o, gate/up, down)
    # and every projection expands
    assert _forward_counting(engine, [(PROMPTS[0], "qv-r4"), (PROMPTS[2], "all-r16-rslora")]) == (4 * layers, 7 * layers)
