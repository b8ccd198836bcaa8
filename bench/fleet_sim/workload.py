"""The fleet workload: many adapters with Zipf popularity, bursty arrivals, short chat-like requests.

- Popularity: adapter of rank k (k = 1..n) is asked for with probability proportional to
  1 / k^zipf_s. Ranks are shuffled over adapter ids (seeded), so that an adapter's name says
  nothing about its popularity (a hash ring sees no pattern).
- Arrivals: a two-state Markov-modulated Poisson process (MMPP-2). In the burst state the rate
  is `burst_factor` times the mean; the calm state's rate is set so that the long-run mean is
  `rate`. Dwell times in each state are exponential. With burst_factor = 1 it is Poisson.
- Lengths: prompt and output lengths uniform over ranges; outputs are generated to the full
  length (ignore_eos), as in bench/workload.py.

The same spec, scaled down (fewer adapters, replicas and seconds), drives the real loopback run,
so the simulated and the real fleet see the same kind of traffic.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class FleetWorkload:
    num_adapters: int = 10_000
    zipf_s: float = 1.0
    rate: float = 20.0  # mean requests per second, whole fleet
    duration_s: float = 300.0
    burst_factor: float = 3.0  # rate in the burst state / mean rate
    burst_share: float = 0.2  # long-run share of time in the burst state
    burst_mean_s: float = 5.0  # mean dwell time of a burst
    input_range: tuple[int, int] = (8, 32)
    output_range: tuple[int, int] = (8, 32)
    seed: int = 0

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def scaled(self, **changes) -> "FleetWorkload":
        return FleetWorkload(**{**asdict(self), **changes})


@dataclass
class Trace:
    """Requests as parallel arrays, sorted by arrival."""

    arrival: np.ndarray  # seconds
    adapter: np.ndarray  # adapter id, 0..num_adapters-1
    prompt_len: np.ndarray
    output_len: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival)


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    ranks = np.arange(1, n + 1, dtype=np.float64)
    w = ranks ** -s
    return w / w.sum()


def mmpp_arrivals(rng: np.random.Generator, spec: FleetWorkload) -> np.ndarray:
    """Arrival times of an MMPP-2 with mean rate spec.rate over [0, duration).

    The burst schedule (the dwell times) has its own random stream, seeded by spec.seed alone:
    fleets of different sizes (different rates) then see their bursts at the same moments."""
    if spec.burst_factor < 1 or not 0 < spec.burst_share < 1:
        raise ValueError("burst_factor must be >= 1 and burst_share in (0, 1)")
    hi = spec.rate * spec.burst_factor
    lo = spec.rate * (1 - spec.burst_share * spec.burst_factor) / (1 - spec.burst_share)
    if lo < 0:
        raise ValueError("burst_factor * burst_share must be <= 1 (the calm rate would be negative)")
    calm_mean_s = spec.burst_mean_s * (1 - spec.burst_share) / spec.burst_share
    schedule = np.random.default_rng([spec.seed, 1])
    times, t, burst = [], 0.0, False
    while t < spec.duration_s:
        dwell = schedule.exponential(spec.burst_mean_s if burst else calm_mean_s)
        end = min(t + dwell, spec.duration_s)
        r = hi if burst else lo
        if r > 0:
            n = rng.poisson(r * (end - t))
            times.append(np.sort(rng.uniform(t, end, n)))
        t, burst = end, not burst
    return np.concatenate(times) if times else np.zeros(0)


def generate(spec: FleetWorkload) -> Trace:
    rng = np.random.default_rng(spec.seed)
    arrival = mmpp_arrivals(rng, spec)
    n = len(arrival)
    by_rank = rng.permutation(spec.num_adapters)  # adapter id of popularity rank k
    ranks = rng.choice(spec.num_adapters, size=n, p=zipf_probabilities(spec.num_adapters, spec.zipf_s))
    lo, hi = spec.input_range
    prompt = rng.integers(lo, hi, size=n, endpoint=True)
    lo, hi = spec.output_range
    output = rng.integers(lo, hi, size=n, endpoint=True)
    return Trace(arrival, by_rank[ranks], prompt, output)


def summary(trace: Trace, spec: FleetWorkload) -> dict:
    counts = np.bincount(trace.adapter, minlength=spec.num_adapters) if len(trace) else np.zeros(1)
    gaps = np.diff(trace.arrival)
    return {
        "requests": len(trace),
        "mean_rate": len(trace) / spec.duration_s,
        "distinct_adapters": int((counts > 0).sum()),
        "top_adapter_share": float(counts.max() / max(1, len(trace))),
        "interarrival_cv": float(gaps.std() / gaps.mean()) if len(gaps) > 1 else 0.0,
        "mean_prompt_len": float(trace.prompt_len.mean()) if len(trace) else 0.0,
        "mean_output_len": float(trace.output_len.mean()) if len(trace) else 0.0,
    }
