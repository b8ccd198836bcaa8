"""Controlled decode-step measurements (no arrival process): median step times at a fixed batch.

- `engine_decode_steps`: loraplex's decode step with `batch` rows, rows spread round-robin over
  `distinct` adapters (0: no adapter).
- `dense_floor`: the same step's dense matmuls timed alone: F.linear on every projection of every
  layer plus the lm_head, with the engine's own weights and the same batch size.
- `peft_decode_steps`: the same decode step through transformers + PEFT (one PeftModel, mixed
  `adapter_names`), KV cache kept between steps.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def engine_decode_steps(engine, batch: int, adapters: list[str], prompt_len: int = 16, steps: int = 10,
                        between=None) -> float | tuple[float, float]:
    """Median decode-step milliseconds; `adapters` lists one name per distinct adapter (may be empty).

    With `between` (a callable), it also runs and times that callable between decode steps and
    returns (step ms, between ms), both medians: the two alternate, so a slow patch of a shared
    machine slows both alike."""
    from loraplex.engine.core.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 3, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = [(7 * i + j) % 200 + 10 for j in range(prompt_len)]
        engine.add_request(f"step-{time.perf_counter_ns()}-{i}", prompt, params, adapters[i % len(adapters)] if adapters else None)
    deadline = time.monotonic() + 120
    while engine.scheduler.waiting and time.monotonic() < deadline:  # prefill (and any adapter loads)
        if not engine.step():
            time.sleep(0.002)
    engine.step()  # the last prefill chunk, if any, or a first decode
    times, other = [], []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
        if between is not None and engine.has_unfinished():
            t = time.perf_counter()
            between()
            other.append(time.perf_counter() - t)
    # every row decodes in every step here (same lengths): drop the final, possibly partial step
    step_ms = 1000 * statistics.median(times[:-1] or times)
    return (step_ms, 1000 * statistics.median(other)) if between is not None else step_ms


def dense_floor(model, batch: int, repeats: int = 5) -> float:
    """Median milliseconds of the step's dense matmuls alone."""
    run = dense_pass(model, batch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def dense_pass(model, batch: int):
    """A callable doing one step's dense matmuls: F.linear on every projection and the lm_head."""
    weights = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        weights += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                    m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
    weights.append(model.lm_head.weight)
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}
    @torch.inference_mode()
    def run() -> None:
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    run()  # warm
    return run


@torch.inference_mode()
def peft_decode_steps(model, batch: int, adapter_names: list[str], prompt_len: int = 16, steps: int = 10) -> float:
    """Median decode-step milliseconds through HF + PEFT with mixed adapter_names ('__base__' = none)."""
    ids = torch.tensor([[(7 * i + j) % 200 + 10 for j in range(prompt_len)] for i in range(batch)])
    names = [adapter_names[i % len(adapter_names)] for i in range(batch)] if adapter_names else ["__base__"] * batch
    kwargs = {"adapter_names": names} if hasattr(model, "peft_config") else {}
    out = model(input_ids=ids, use_cache=True, **kwargs)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    times = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        t = time.perf_counter()
        out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True, **kwargs)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
        cache = out.past_key_values
    return 1000 * statistics.median(times)
