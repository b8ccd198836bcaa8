"""The fleet workload: many adapters with Zipf popularity, bursty arrivals, short chat-like requests.

- Popularity: adapter of rank k (k = 1..n) is asked for with probability proportional to
  1 / k^zipf_s. Ranks are shuffled over adapter ids (seeded), so that an adapter's name says
  nothing about its popularity (a hash ring sees no pattern).
- Arrivals: a two-state Markov-modulated Poisson process (MMPP-2). In the burst state the rate
  is `burst_factor` times the mean; the calm state's rate is set so that the long-run mean is
  `rate`. Dwell times in each state are exponential. With burst_factor = 1 it is Poisson.
- Lengths: prompt and output lengths uniform over ranges; outputs are generated to the full
  length (ignore_eos), as in bench/workload.py.
- Shifting popularity (`shift_every_s`, off by default): the ranking drifts in epochs. At each
  epoch boundary each of the `shift_top` hottest ranks swaps, with probability `shift_prob`,
  with an adapter drawn uniformly from the other ranks: yesterday's hot adapters cool down and
  cold ones (loaded nowhere) become hot. Its own random stream (seed, 2): every fleet size sees
  the same shifts at the same moments.
- Diurnal rate (`diurnal_period_s`, off by default): within each period a day of
  `1 - night_share` of it, whose rate follows a half sine (zero at dawn and dusk, peak pi/2 over
  the day's mean), then a quiet night with only a trickle of `night_rate` requests per second,
  whatever the fleet size. The MMPP bursts ride on top (arrivals thinned by the day's shape),
  and the long-run mean stays `rate` (plus the trickle).

The same spec, scaled down (fewer adapters, replicas and seconds), drives the real loopback run,
so the simulated and the real fleet see the same kind of traffic.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

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
    shift_every_s: float | None = None  # popularity epochs (None: one ranking for the whole run)
    shift_top: int = 100
    shift_prob: float = 0.5
    diurnal_period_s: float | None = None  # None: a flat mean rate
    night_share: float = 0.25
    night_rate: float = 0.0  # requests per second during the night, whole fleet

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


def day_shape(t: np.ndarray, spec: FleetWorkload) -> np.ndarray:
    """The diurnal rate multiplier at times t (mean 1 over a period; 0 at night)."""
    day = 1.0 - spec.night_share
    u = np.mod(t, spec.diurnal_period_s) / spec.diurnal_period_s
    peak = np.pi / (2 * day)  # a half sine over the day has mean 2/pi of its peak
    return np.where(u < day, peak * np.sin(np.pi * np.minimum(u / day, 1.0)), 0.0)


def diurnal_arrivals(rng: np.random.Generator, spec: FleetWorkload) -> np.ndarray:
    """MMPP arrivals at the day's peak rate, thinned by the day's shape, plus the night's trickle."""
    if not 0 <= spec.night_share < 1:
        raise ValueError("night_share must be in [0, 1)")
    peak = np.pi / (2 * (1.0 - spec.night_share))
    dense = mmpp_arrivals(rng, replace(spec, rate=spec.rate * peak))
    kept = dense[rng.uniform(0, peak, size=len(dense)) < day_shape(dense, spec)]
    night = np.zeros(0)
    if spec.night_rate > 0:
        trickle = rng.uniform(0, spec.duration_s, rng.poisson(spec.night_rate * spec.duration_s))
        u = np.mod(trickle, spec.diurnal_period_s) / spec.diurnal_period_s
        night = trickle[u >= 1.0 - spec.night_share]
    return np.sort(np.concatenate([kept, night]))


def rankings(spec: FleetWorkload, epochs: int) -> np.ndarray:
    """(epochs, num_adapters): the adapter id of each popularity rank, epoch by epoch."""
    n, top = spec.num_adapters, min(spec.shift_top, spec.num_adapters - 1)
    drift = np.random.default_rng([spec.seed, 2])
    out = np.empty((epochs, n), dtype=np.int64)
    by_rank = np.random.default_rng([spec.seed, 3]).permutation(n)
    for e in range(epochs):
        if e:
            for k in np.flatnonzero(drift.uniform(size=top) < spec.shift_prob):
                j = int(drift.integers(top, n))
                by_rank[k], by_rank[j] = by_rank[j], by_rank[k]
        out[e] = by_rank
    return out


def epoch_of(t: np.ndarray, spec: FleetWorkload) -> np.ndarray:
    if not spec.shift_every_s:
        return np.zeros(len(t), dtype=np.int64)
    return (np.asarray(t) // spec.shift_every_s).astype(np.int64)


def generate(spec: FleetWorkload) -> Trace:
    rng = np.random.default_rng(spec.seed)
    arrival = diurnal_arrivals(rng, spec) if spec.diurnal_period_s else mmpp_arrivals(rng, spec)
    n = len(arrival)
    if spec.shift_every_s or spec.diurnal_period_s:
        ranks = rng.choice(spec.num_adapters, size=n, p=zipf_probabilities(spec.num_adapters, spec.zipf_s))
        epoch = epoch_of(arrival, spec)
        table = rankings(spec, int(epoch.max()) + 1 if n else 1)
        adapter = table[epoch, ranks]
    else:  # the original stream, draw for draw (the committed runs and the loopback validation)
        by_rank = rng.permutation(spec.num_adapters)  # adapter id of popularity rank k
        ranks = rng.choice(spec.num_adapters, size=n, p=zipf_probabilities(spec.num_adapters, spec.zipf_s))
        adapter = by_rank[ranks]
    lo, hi = spec.input_range
    prompt = rng.integers(lo, hi, size=n, endpoint=True)
    lo, hi = spec.output_range
    output = rng.integers(lo, hi, size=n, endpoint=True)
    return Trace(arrival, adapter, prompt, output)


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
    } | (shape_summary(trace, spec) if spec.shift_every_s or spec.diurnal_period_s else {})


def shape_summary(trace: Trace, spec: FleetWorkload) -> dict:
    """How much the hot set moves per epoch and how the rate swings over the day."""
    epochs = int(epoch_of(np.array([max(0.0, spec.duration_s - 1e-9)]), spec)[0]) + 1
    table = rankings(spec, epochs)
    turnover = [len(set(table[e, :10]) - set(table[e - 1, :10])) / 10 for e in range(1, epochs)]
    per_min = np.bincount((trace.arrival // 60).astype(np.int64), minlength=int(np.ceil(spec.duration_s / 60)))
    out = {"epochs": epochs, "top10_turnover_per_epoch": float(np.mean(turnover)) if turnover else 0.0,
           "peak_minute_rate": float(per_min.max() / 60) if len(per_min) else 0.0}
    if spec.diurnal_period_s:
        u = np.mod(trace.arrival, spec.diurnal_period_s) / spec.diurnal_period_s
        out["night_requests"] = int((u >= 1.0 - spec.night_share).sum())
    return out
