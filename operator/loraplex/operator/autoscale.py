"""Autoscaling of an engine Deployment from the engines' own /metrics.

The decision is a pure function with the Kubernetes HPA's algorithm: a per-pod average of the
metric against a target, a tolerance band, then stabilization windows (a scale-up needs every
recommendation inside the up-window to be above the current size, a scale-down takes the
highest recommendation inside the down-window), then [minReplicas, maxReplicas].
The result goes to the Deployment's replicas and the BaseModelDeployment's status, never to
its spec.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

METRICS = {
    "num_requests_running": "loraplex_num_requests_running",
    "num_requests_waiting": "loraplex_num_requests_waiting",
    "kv_cache_usage_ratio": "loraplex_kv_cache_usage_ratio",
}
TOLERANCE = 0.1

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)(\s+\d+)?\s*$")


def parse_metric(text: str, name: str) -> float | None:
    """Sum of all samples of the metric `name` in Prometheus text format (None when absent)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line.strip())
        if not m or m.group(1) != name:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        if math.isnan(v):
            continue
        total += v
        seen = True
    return total if seen else None


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    metric: str
    target: float
    up_window: float
    down_window: float

    @classmethod
    def from_spec(cls, autoscaling: dict) -> "Policy":
        return cls(
            min_replicas=int(autoscaling.get("minReplicas", 1)),
            max_replicas=int(autoscaling.get("maxReplicas", 4)),
            metric=str(autoscaling.get("metric", "num_requests_running")),
            target=float(autoscaling.get("target", 8)),
            up_window=float(autoscaling.get("scaleUpStabilizationSeconds", 0)),
            down_window=float(autoscaling.get("scaleDownStabilizationSeconds", 300)),
        )


@dataclass(frozen=True)
class Decision:
    desired: int
    recommendation: int | None
    reason: str
    history: tuple[tuple[float, int], ...]


def recommend(current: int, samples: list[float], target: float) -> int | None:
    """Raw recommendation from the per-pod samples (None without any sample)."""
    if not samples or target <= 0:
        return None
    avg = sum(samples) / len(samples)
    ratio = avg / target
    if abs(ratio - 1.0) <= TOLERANCE:
        return current
    return max(math.ceil(len(samples) * ratio), 0)


def decide(current: int, samples: list[float], policy: Policy, history: tuple[tuple[float, int], ...],
           now: float) -> Decision:
    """New replica count for a Deployment of `current` replicas."""
    lo, hi = policy.min_replicas, max(policy.max_replicas, policy.min_replicas)
    rec = recommend(current, samples, policy.target)
    keep = max(policy.up_window, policy.down_window)
    hist = tuple((t, r) for t, r in history if now - t <= keep)
    if rec is None:
        desired = max(lo, min(hi, current))
        why = "no metrics" if desired == current else "held inside [min, max]"
        return Decision(desired, None, why, hist)
    hist = hist + ((now, rec),)
    ups = [r for t, r in hist if now - t <= policy.up_window]
    downs = [r for t, r in hist if now - t <= policy.down_window]
    desired = current
    up_rec, down_rec = min(ups), max(downs)
    if desired < up_rec:
        desired = up_rec
    if desired > down_rec:
        desired = down_rec
    clamped = max(lo, min(hi, desired))
    avg = sum(samples) / len(samples)
    reason = (f"{policy.metric} averages {avg:.3g} per pod over {len(samples)} pods "
              f"(target {policy.target:g}): recommendation {rec}")
    if desired != rec:
        reason += f", stabilized to {desired}"
    if clamped != desired:
        reason += f", held inside [{lo}, {hi}] at {clamped}"
    return Decision(clamped, rec, reason, hist)
