"""Warm placement in the simulator: which pods keep which adapter, fixed or automatic.

Pods are chosen as the operator's `spread` policy does (loraplex.operator.placement.score:
rendezvous hashing of (adapter, pod name)); only how many pods an adapter gets differs.

- `fixed`: every adapter on `replicas` pods (the operator's default: 2). A placement is what
  the operator does today: it registers the adapter there, nothing is loaded ahead of a
  request, and when pods come and go the new placement applies at once.
- `auto`: the operator's `placement.replicas: auto` rule. Per adapter, wanted pods =
  clamp(ceil(rate / target_rps), min, max), the rate counted over the last `window_s` of
  routed requests and re-evaluated every `interval_s` (the operator's pass). A raise applies
  at once; a cut only once every pass of the last `cooldown_s` wanted fewer pods (hysteresis),
  and then to the most any of them wanted (the HPA's scale-down stabilization, per adapter;
  the history starts full of the first count, as a fresh operator seeds its own). A pod that gains an
  adapter with traffic prefetches it (disk -> host). Make before break: a pod leaves an
  adapter's placement only once the adapter is warm (in host RAM or a slot) on a pod of the new
  placement, or was not warm on the leaving pod, or the pod is gone; so a placement change never
  leaves a warm adapter cold everywhere.

For both, `hotness` (request counts decayed with a 30-minute time constant) orders what a
waking pod loads first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from loraplex.operator.placement import score

HOT_TAU_S = 1800.0  # memory of "hottest first": long enough to survive a quiet night


@dataclass(frozen=True)
class PlacementRule:
    mode: str = "fixed"  # "fixed" | "auto"
    replicas: int = 2  # fixed: pods per adapter
    min: int = 1  # auto: the bounds of wanted pods
    max: int | None = None  # auto: None = every pod
    target_rps: float = 0.5  # auto: targetRequestsPerPod, requests per second per pod
    window_s: float = 60.0
    cooldown_s: float = 300.0
    interval_s: float = 15.0

    def __post_init__(self):
        if self.mode not in ("fixed", "auto"):
            raise ValueError(f"placement mode {self.mode!r}: fixed or auto")
        if self.window_s < self.interval_s or self.target_rps <= 0:
            raise ValueError("window_s must be >= interval_s and target_rps > 0")

    def describe(self) -> str:
        if self.mode == "fixed":
            return f"fixed: {self.replicas} pods per adapter (spread)"
        hi = "all pods" if self.max is None else self.max
        return (f"auto: ceil(rate / {self.target_rps:g} req/s) pods, in [{self.min}, {hi}], rate over "
                f"{self.window_s:g} s, cut after {self.cooldown_s:g} s low")


def wanted(rate: np.ndarray, rule: PlacementRule, num_pods: int) -> np.ndarray:
    """The auto rule's wanted pod count per adapter, clamped to [min, max] and to the pods there are."""
    hi = num_pods if rule.max is None else min(rule.max, num_pods)
    lo = min(rule.min, hi)
    return np.clip(np.ceil(np.asarray(rate, dtype=np.float64) / rule.target_rps - 1e-9), lo, hi).astype(np.int64)


class Placement:
    """The placement of `len(names)` adapters over a changing set of pods."""

    def __init__(self, rule: PlacementRule, names: list[str]):
        self.rule, self.names = rule, names
        n = len(names)
        first = rule.replicas if rule.mode == "fixed" else rule.min
        self.count = np.full(n, first, dtype=np.int64)  # decided pods per adapter (before clamping to the fleet)
        passes = max(1, int(round(rule.cooldown_s / rule.interval_s)))
        self.recent = np.full((passes, n), first, dtype=np.int64)  # auto: wanted at the passes of the last cooldown_s
        self.pass_no = 0
        self.placed: list[list[int]] = [[] for _ in range(n)]  # pod ids, as routing sees them
        self.target: list[list[int]] = [[] for _ in range(n)]
        self.unsettled: set[int] = set()  # adapters with placed != target (make before break)
        self.pods: list[int] = []
        self.columns: dict[int, int] = {}
        self.scores = np.zeros((n, 0), dtype=np.uint64)
        nbins = int(round(rule.window_s / rule.interval_s))
        self.bins = np.zeros((nbins, n), dtype=np.int64)
        self.cur = 0
        self.hotness = np.zeros(n)
        self.rate = np.zeros(n)
        self.changes = 0  # pods added to or dropped from adapters' placements

    # ---- inputs ---------------------------------------------------------------------------

    def note_request(self, adapter: int) -> None:
        self.bins[self.cur, adapter] += 1

    def _column(self, pod: int) -> int:
        col = self.columns.get(pod)
        if col is None:
            name = f"pod-{pod}"
            column = np.array([score(a, name) for a in self.names], dtype=np.uint64)
            self.scores = np.concatenate([self.scores, column[:, None]], axis=1)
            col = self.columns[pod] = self.scores.shape[1] - 1
        return col

    def ranking(self, adapter: int, pods: list[int]) -> list[int]:
        """`pods` in the adapter's rendezvous order (highest score first)."""
        row = self.scores[adapter]
        return sorted(pods, key=lambda p: -int(row[self._column(p)]))

    # ---- decisions ------------------------------------------------------------------------

    def _targets(self, adapters: np.ndarray) -> None:
        if not len(adapters) or not self.pods:
            for a in adapters:
                self.target[a] = []
            return
        cols = np.array([self._column(p) for p in self.pods])
        pods = np.array(self.pods)
        order = np.argsort(self.scores[np.ix_(adapters, cols)], axis=1)[:, ::-1]
        k = np.minimum(self.count[adapters], len(pods))
        for row, a in enumerate(adapters):
            self.target[a] = pods[order[row, :k[row]]].tolist()

    def set_pods(self, pods: list[int], now: float, warm) -> list[tuple[int, int]]:
        """The pods that take placements changed (a pod was created, or is leaving): re-place
        every adapter. Returns (adapter, pod) additions that should prefetch."""
        self.pods = sorted(pods)
        self._targets(np.arange(len(self.names)))
        return self._apply(range(len(self.names)), warm)

    def evaluate(self, now: float, warm) -> list[tuple[int, int]]:
        """One operator pass, every interval_s: rates, the auto rule, pending removals."""
        counts = self.bins.sum(axis=0)
        self.rate = counts / self.rule.window_s
        self.hotness = self.hotness * math.exp(-self.rule.interval_s / HOT_TAU_S) + self.bins[self.cur]
        self.cur = (self.cur + 1) % len(self.bins)
        self.bins[self.cur] = 0
        changed = np.zeros(0, dtype=np.int64)
        if self.rule.mode == "auto":
            changed = self._auto(now)
            self._targets(changed)
        return self._apply(sorted(set(changed.tolist()) | self.unsettled), warm)

    def _auto(self, now: float) -> np.ndarray:
        w = wanted(self.rate, self.rule, max(1, len(self.pods)))
        self.recent[self.pass_no % len(self.recent)] = w
        self.pass_no += 1
        before = self.count.copy()
        # up at once; down only to the most wanted by any pass of the cool-down window
        self.count = np.where(w > self.count, w, np.minimum(self.count, self.recent.max(axis=0)))
        return np.flatnonzero(self.count != before)

    def _apply(self, adapters, warm) -> list[tuple[int, int]]:
        """Move `placed` toward `target`: additions at once; removals (auto) only when safe."""
        prefetch = []
        alive = set(self.pods)
        auto = self.rule.mode == "auto"
        for a in adapters:
            target, placed = self.target[a], self.placed[a]
            if placed == target:
                self.unsettled.discard(a)
                continue
            keep = [p for p in placed if p in target]
            added = [p for p in target if p not in placed]
            self.changes += len(added)
            if auto and self.rate[a] > 0:
                prefetch += [(a, p) for p in added]
            leaving = []  # fixed: the old pods go at once
            if auto and not any(warm(a, p) for p in target):  # keep old pods where it is warm
                leaving = [p for p in placed if p not in target and p in alive and warm(a, p)]
            self.changes += len(placed) - len(keep) - len(leaving)
            self.placed[a] = keep + added + leaving
            if leaving:
                self.unsettled.add(a)
            else:
                self.placed[a] = list(target)
                self.unsettled.discard(a)
        return prefetch

    def drop_pod(self, pod: int) -> None:
        """A pod is gone (deleted after draining): no placement may name it."""
        for a in list(self.unsettled):
            if pod in self.placed[a]:
                self.placed[a] = [p for p in self.placed[a] if p != pod]

    def on_pod(self, pod: int) -> np.ndarray:
        """Adapters placed on `pod`, hottest first, those ever asked for only."""
        mine = np.array([a for a in range(len(self.names)) if pod in self.target[a]], dtype=np.int64)
        if not len(mine):
            return mine
        mine = mine[self.hotness[mine] > 0]
        return mine[np.argsort(-self.hotness[mine], kind="stable")]
