"""A projection that no adapter of the batch targets runs no LoRA term (its slot weights are zero)."""
import dataclasses

import torch

from loraplex.engine.sampling_params import SamplingParams
from loraplex.engine.scheduler import ScheduledSeq
from tests.engine.conftest import PROMPTS
from tests.lora.conftest import make_engine, register_all, wait_for


def _forward_counting(engine, rows):
    seqs = [engine.make_sequence(f"s{i}", p, SamplingParams(max_tokens=1), a) for i, (p, a) in enumerate(rows)]
    batch = []
    for seq in seqs:
        assert engine.adapters.acquire(seq)
        engine.block_manager.grow(seq, seq.num_tokens)
        batch.append(ScheduledSeq(seq, seq.num_tokens))
    batch.sort(key=lambda item: item.seq.lora_slot)
    ids, positions, attn, lora, _ = engine.runner._prepare(batch)
    calls = []
    ops = engine.runner.ops

    def counting(y, x, a, b, lb):
        calls.append(a.shape)
        return ops.add_lora(y, x, a, b, lb)

    with torch.inference_mode():
        engine.runner.model(ids, positions, attn, lora, dataclasses.replace(ops, add_lora=counting), engine.runner.kv_caches)
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
