"""S-LoRA's synthetic workload (Sheng et al. 2023, §7.1), with the same draws.

- Adapter of request i: floor(n * X_i), X_i ~ power law on [0, 1] with density a x^(a-1)
  (numpy's `power(a)`). alpha = 1 is uniform over the n adapters; a smaller alpha concentrates
  requests on a few adapters (ids near 0).
- Arrivals: Gamma inter-arrival times with mean 1/rate and coefficient of variation cv
  (shape 1/cv^2, scale cv^2/rate). cv = 1 is a Poisson process; cv > 1 is burstier.
- Input/output lengths: uniform integers in [lo, hi], or drawn from a given list.
- Prompts: random token ids (S-LoRA uses dummy prompts of the drawn length) so every system
  sees exactly the same tokens, with no tokenizer in the measurement.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    idx: int
    arrival: float  # seconds after the run starts
    adapter: int  # index into the adapter list, or -1 for the base model
    prompt: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int
    rate: float  # requests per second
    num_adapters: int  # 0: every request on the base model
    alpha: float = 1.0
    cv: float = 1.0
    input_range: tuple[int, int] = (8, 64)
    output_range: tuple[int, int] = (8, 32)
    input_lens: tuple[int, ...] | None = None  # a list to draw from instead of the range
    output_lens: tuple[int, ...] | None = None
    vocab_size: int = 1000
    seed: int = 0

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _lengths(rng: np.random.Generator, n: int, lo_hi: tuple[int, int], choices) -> np.ndarray:
    if choices:
        return rng.choice(np.asarray(choices, dtype=np.int64), size=n)
    lo, hi = lo_hi
    return rng.integers(lo, hi, size=n, endpoint=True)


def generate(spec: WorkloadSpec) -> list[Request]:
    if spec.alpha <= 0 or spec.cv <= 0 or spec.rate <= 0:
        raise ValueError("alpha, cv and rate must be positive")
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    x = rng.power(spec.alpha, n)  # drawn even for the base model, so every spec shares the later draws
    if spec.num_adapters > 0:
        adapters = np.minimum((x * spec.num_adapters).astype(np.int64), spec.num_adapters - 1)
    else:
        adapters = np.full(n, -1)
    in_lens = _lengths(rng, n, spec.input_range, spec.input_lens)
    out_lens = _lengths(rng, n, spec.output_range, spec.output_lens)
    shape = 1.0 / (spec.cv * spec.cv)
    scale = spec.cv * spec.cv / spec.rate
    arrivals = np.cumsum(rng.gamma(shape, scale, n))
    arrivals -= arrivals[0]  # the first request arrives at t = 0
    # Token ids away from 0 (often special tokens) and below the vocab.
    lo = min(10, spec.vocab_size - 1)
    return [Request(i, float(arrivals[i]), int(adapters[i]),
                    tuple(int(t) for t in rng.integers(lo, spec.vocab_size, size=int(in_lens[i]))),
                    int(out_lens[i]))
            for i in range(n)]


def summary(requests: list[Request]) -> dict:
    used = {r.adapter for r in requests if r.adapter >= 0}
    counts = np.bincount([r.adapter for r in requests if r.adapter >= 0]) if used else np.array([0])
    return {
        "num_requests": len(requests),
        "duration_s": requests[-1].arrival if requests else 0.0,
        "distinct_adapters": len(used),
        "top_adapter_share": float(counts.max() / max(1, len(requests))),
        "mean_input_len": float(np.mean([len(r.prompt) for r in requests])) if requests else 0.0,
        "mean_output_len": float(np.mean([r.output_len for r in requests])) if requests else 0.0,
    }
