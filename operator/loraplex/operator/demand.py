"""Load-following placement: each adapter's request rate from the engines' own counters, and the
pure decision of how many pods keep a `placement.replicas: auto` adapter warm.

Rates. Every engine counts `loraplex_requests_total{adapter, status}`. The operator's timer
(scaling.observe_base) reads each Ready pod's /metrics (with the base's admin token, so that
restricted adapters show under their names) and keeps, per pod, the samples of the last window
(`Sample`). An adapter's rate is the sum over the pods of (increase of its counter over the
window) / (time the pod's samples span); a counter that went down started again (an engine
restart): its new value is the increase. An engine labels at most --max-adapter-metric-labels
adapters (100) by name and counts the rest as `other`: those adapters count as cold (rate 0).

The decision (`decide`), for an adapter at `current` warm pods with `rate` requests a second:
  up   = clamp(ceil(rate / target), min, max)            more pods at once when up > current
  down = clamp(ceil(rate / (target * DOWN_FRACTION)), min, max)
         fewer pods (down) only once down < current held for `scaleDownDelaySeconds` on end
Between the two (a rate that would fit fewer pods, but not at DOWN_FRACTION of the target) the
count stays: the hysteresis band that keeps placement from churning.

`AdapterRates` (the runtime's `adapter_rates`) is this module's state: per base, the samples, the
rates and the last decision of each auto adapter. The adapter catalog reads it too (hottest first).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .adapters import SpecProblem
from .constants import Key

REQUESTS_METRIC = "loraplex_requests_total"
OTHER_LABELS = frozenset({"other", "unknown"})  # the engine's capped and unknown-model labels

# The constants of an auto placement, and their spec fields (LoraAdapter spec.placement, default
# the base's spec.placement).
DEFAULT_MIN = 1
DEFAULT_MAX = 8
DEFAULT_TARGET = 1.0          # targetRequestsPerPod: requests a second one warm pod should carry
DEFAULT_WINDOW = 60           # rateWindowSeconds: the rate is measured over this
DEFAULT_DOWN_DELAY = 120      # scaleDownDelaySeconds: fewer pods only after this long below the band
DOWN_FRACTION = 0.7           # fewer pods only when each would carry at most 70 % of the target
MAX_PODS = 1000
UNMEASURED = "no request rate measured yet"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)(\s+\d+)?\s*$")
_ADAPTER = re.compile(r'(?:^|[{,])\s*adapter="((?:[^"\\]|\\.)*)"')


def adapter_counts(text: str) -> dict[str, float]:
    """adapter -> its `loraplex_requests_total` summed over the other labels (statuses), from
    Prometheus text. `other` and `unknown` are left out: they name no adapter."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(REQUESTS_METRIC):
            continue
        m = _SAMPLE.match(line.strip())
        if not m or m.group(1) != REQUESTS_METRIC or not m.group(2):
            continue
        a = _ADAPTER.search(m.group(2))
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        if a is None or a.group(1) in OTHER_LABELS or math.isnan(v):
            continue
        out[a.group(1)] = out.get(a.group(1), 0.0) + v
    return out


@dataclass(frozen=True)
class Sample:
    """One pod's request counters at one time (monotonic seconds)."""

    at: float
    counts: Mapping[str, float]


def keep(samples: Iterable[Sample], window: float, now: float) -> tuple[Sample, ...]:
    """The samples a window needs: those inside it, and the last one before it (its baseline)."""
    ordered = sorted(samples, key=lambda s: s.at)
    inside = [s for s in ordered if now - s.at <= window]
    before = [s for s in ordered if now - s.at > window]
    return tuple(before[-1:] + inside)


def pod_rate(samples: Iterable[Sample], adapter: str, window: float, now: float) -> float:
    """One pod's rate of `adapter` (requests a second) over the window; 0 with fewer than two samples."""
    s = keep(samples, window, now)
    if len(s) < 2 or s[-1].at <= s[0].at:
        return 0.0
    increase = 0.0
    for a, b in zip(s, s[1:]):
        before, after = a.counts.get(adapter, 0.0), b.counts.get(adapter, 0.0)
        increase += after - before if after >= before else after  # went down: the engine restarted
    return increase / (s[-1].at - s[0].at)


def rates(per_pod: Mapping[str, Iterable[Sample]], window: float, now: float) -> dict[str, float]:
    """adapter -> requests a second summed over the pods."""
    per_pod = {p: tuple(s) for p, s in per_pod.items()}
    names = {n for samples in per_pod.values() for s in samples for n in s.counts}
    out = {n: sum(pod_rate(samples, n, window, now) for samples in per_pod.values()) for n in sorted(names)}
    return {n: r for n, r in out.items() if r > 0}


@dataclass(frozen=True)
class AutoPolicy:
    """The bounds and constants of one `replicas: auto` placement."""

    min: int = DEFAULT_MIN
    max: int = DEFAULT_MAX
    target: float = DEFAULT_TARGET
    window: float = DEFAULT_WINDOW
    down_delay: float = DEFAULT_DOWN_DELAY

    @classmethod
    def from_spec(cls, placement: Mapping) -> "AutoPolicy":
        """From a merged placement (the adapter's fields over its base's). Raises SpecProblem."""
        def number(key: str, default: float, lo: float, hi: float, integer: bool) -> float:
            raw = placement.get(key, default)
            try:
                value = float(raw) if not isinstance(raw, bool) else math.nan
            except (TypeError, ValueError):
                value = math.nan
            if not (lo <= value <= hi) or (integer and value != int(value)):
                kind = "an integer" if integer else "a number"
                raise SpecProblem("InvalidPlacement", f"placement.{key} must be {kind} in [{lo:g}, {hi:g}], "
                                                      f"got {raw!r}")
            return int(value) if integer else value
        lo = number("min", DEFAULT_MIN, 1, MAX_PODS, True)
        hi = number("max", DEFAULT_MAX, 1, MAX_PODS, True)
        if lo > hi:
            raise SpecProblem("InvalidPlacement", f"placement.min ({lo}) must be <= placement.max ({hi})")
        target = number("targetRequestsPerPod", DEFAULT_TARGET, 1e-6, 1e6, False)
        window = number("rateWindowSeconds", DEFAULT_WINDOW, 5, 3600, True)
        delay = number("scaleDownDelaySeconds", DEFAULT_DOWN_DELAY, 0, 3600, True)
        return cls(int(lo), int(hi), float(target), float(window), float(delay))


@dataclass(frozen=True)
class Warmth:
    """The decision for one auto adapter: its warm pods, why, and since when its rate has been
    below the band (None: it is not)."""

    count: int
    reason: str
    low_since: float | None = None
    measured: bool = True  # False: decided without a rate (none measured yet)

    def keeps_reason_of(self, prev: "Warmth") -> bool:
        """Whether `prev`'s reason still explains this decision (same count, same cooling state, and
        not a first measured rate after an unmeasured one): then the status keeps it, unchurned."""
        return (self.count == prev.count and (self.low_since is None) == (prev.low_since is None)
                and (prev.measured or not self.measured))


def clamp(n: int, policy: AutoPolicy) -> int:
    return max(policy.min, min(policy.max, n))


def describe(count: int, rate: float, policy: AutoPolicy) -> str:
    return (f"{count} pod{'s' if count != 1 else ''}: {rate:.3g} req/s over {policy.window:g} s, "
            f"target {policy.target:g}/pod")


def decide(current: int | None, rate: float | None, policy: AutoPolicy, previous: Warmth | None,
           now: float) -> Warmth:
    """How many pods keep the adapter warm. `current`: its warm pods now (None: unknown, e.g. a
    new adapter); `rate`: requests a second over the window (None: not measured yet)."""
    low_since = previous.low_since if previous is not None else None
    if current is None:
        current = policy.min
    held = clamp(current, policy)
    if rate is None:
        return Warmth(held, f"{held} pod{'s' if held != 1 else ''}: {UNMEASURED} (bounds [{policy.min}, "
                            f"{policy.max}])", measured=False)
    up = clamp(math.ceil(rate / policy.target), policy)
    down = clamp(math.ceil(rate / (policy.target * DOWN_FRACTION)), policy)
    if up > held:
        return Warmth(up, describe(up, rate, policy))
    if down < held:
        since = low_since if low_since is not None else now
        if now - since >= policy.down_delay:
            return Warmth(down, describe(down, rate, policy))
        return Warmth(held, describe(held, rate, policy) + f"; {down} once below {DOWN_FRACTION:g} x target "
                                                           f"for {policy.down_delay:g} s", since)
    return Warmth(held, describe(held, rate, policy))


# --- state ---------------------------------------------------------------------------------------


@dataclass
class BaseDemand:
    """One base: per pod its samples; per adapter its rate (over the base's default window) and,
    for the auto adapters, the last decision."""

    samples: dict[str, tuple[Sample, ...]] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    window: float = DEFAULT_WINDOW
    at: float | None = None
    warm: dict[str, Warmth] = field(default_factory=dict)

    def record(self, counts: Mapping[str, Mapping[str, float]], now: float, keep_seconds: float,
               live: Iterable[str]) -> None:
        """Add one sample per scraped pod (`counts`: pod -> adapter counts); forget the pods not
        `live` and the samples no window needs."""
        live = set(live)
        for pod in [p for p in self.samples if p not in live]:
            del self.samples[pod]
        for pod, c in counts.items():
            self.samples[pod] = keep(self.samples.get(pod, ()) + (Sample(now, dict(c)),), keep_seconds, now)
        self.rates = rates(self.samples, self.window, now)
        self.at = now

    def rate(self, adapter: str, window: float, now: float) -> float | None:
        """The adapter's rate over `window` (None before two samples of any pod)."""
        if not any(len(s) >= 2 for s in self.samples.values()):
            return None
        return sum(pod_rate(s, adapter, window, now) for s in self.samples.values())


@dataclass
class AdapterRates:
    """Per base (Key of the BaseModelDeployment) its BaseDemand. Read by the placement of the
    base pass (`warmth`) and by the adapter catalog (`of_base`, `rate`: hottest first)."""

    bases: dict[Key, BaseDemand] = field(default_factory=dict)

    def base(self, namespace: str, base: str) -> BaseDemand:
        return self.bases.setdefault(Key(namespace, base), BaseDemand())

    def of_base(self, namespace: str, base: str) -> dict[str, float]:
        """adapter -> requests a second over all the base's pods (absent: no request seen)."""
        found = self.bases.get(Key(namespace, base))
        return dict(found.rates) if found is not None else {}

    def rate(self, namespace: str, base: str, adapter: str) -> float:
        return self.of_base(namespace, base).get(adapter, 0.0)

    def warmth(self, namespace: str, base: str, adapter: str) -> Warmth | None:
        found = self.bases.get(Key(namespace, base))
        return found.warm.get(adapter) if found is not None else None

    def forget(self, namespace: str, base: str) -> None:
        self.bases.pop(Key(namespace, base), None)
