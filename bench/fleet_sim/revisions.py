"""Adapter revisions in the simulated fleet: adapters get a new revision while the fleet serves.

A fixed fleet (fleet.py, every pod Ready from the start, the operator's placement) serves every
adapter as revisions, each its own cache entry under the engine's key `<name>@<n>`
(loraplex.manifest.revision_key). At a time drawn for each chosen adapter, revision 2 appears,
and it is rolled out in one of these modes:

- `none`: no new revision (the control run: what the fleet does without a rollout);
- `in-place`: loraplex before issue 23. The new weights replace the old on every pod at once:
  the old entry is unregistered (its host copy and slot go once its running requests finish),
  requests still queued for it run on the new weights, and each pod's first request for the
  new weights pays the disk -> host load on the request path;
- `warm`: warm before shift. The manifest gains revision 2 at 0 %; each pod the adapter is placed
  on starts loading it into host RAM at once (off the step loop); the operator, on its pass
  every `check_s`, moves 100 % to it once every placed pod lists it host or device (and asks a
  pod that dropped it again to reload it); then revision 1 leaves the manifest and each pod
  drops it once the requests that chose it have finished;
- `warm-resident`: a variant of `warm` that loads the new revision ahead on the pods where the
  previous one is resident (host or slot) when it appears, placed or not, and shifts once it is
  resident on all of them: elsewhere the old weights were cold anyway, so loading ahead there
  only adds loads and host-RAM pressure;
- `canary`: the `warm` warm-up, then the split moves through `steps` (10/50/100 %), `step_s`
  apart; revision 1 leaves at 100 %.

Choosing a revision follows the engine's contract: sticky by session (each request carries one
of `sessions` OpenAI `user` values of its adapter); bucket = sha256(name NUL session)[:8] mod
10000, revisions newest first each owning percent x 100 consecutive buckets, so a session never
moves back to an older revision while the newest one's percent grows. Routing sees the adapter's
name, never `x@n`, as a router does (the engine chooses the revision).

Accounting beside fleet.py's: disk loads by cause (a request needs it, or a prefetch); per
(pod, adapter) the first request after the adapter's revision time, whether the weights it chose
were resident when it arrived, and whether the adapter was resident on that pod at that time
(so "cold although it was warm" counts the rollout's own cold loads, and the `none` run, which
records the same pairs at the same times, gives the fleet's ordinary churn to compare);
how long each revision waited to be warm before traffic moved, sessions that went back to an
older revision, and the host-RAM overlap: per pod, adapters with both revisions in host RAM or
a slot, sampled every second.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
from loraplex.manifest import revision_key, split_revision

from bench.fleet_sim.cost import StepCost
from bench.fleet_sim.fleet import ElasticSimulation, ScaleRule
from bench.fleet_sim.placement import PlacementRule
from bench.fleet_sim.policies import Policy
from bench.fleet_sim.replica import Replica, ReplicaConfig, SimRequest
from bench.fleet_sim.workload import FleetWorkload, Trace

MODES = ("none", "in-place", "warm", "warm-resident", "canary")
BUCKETS = 10_000


@dataclass(frozen=True)
class RolloutRule:
    mode: str = "warm"
    start_s: float = 300.0  # the first new revision
    spread_s: float = 300.0  # revisions appear at uniform random times in [start, start + spread)
    adapters: int | None = None  # how many adapters get a revision, drawn at random; None: all
    steps: tuple[float, ...] = (10.0, 50.0, 100.0)  # canary: the new revision's percent, step by step
    step_s: float = 60.0
    check_s: float = 5.0  # the operator's pass while a revision warms (reads the pods' listings)
    sessions: int = 50  # distinct sessions (OpenAI `user`) per adapter
    adapter_bytes: int = 3_686_400  # one revision's weights in host RAM (the measured adapter)
    sample_s: float = 1.0  # how often the host overlap is sampled

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"rollout mode {self.mode!r}: one of {', '.join(MODES)}")
        if not self.steps or self.steps[-1] != 100 or any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError("steps must increase strictly and end at 100")

    @property
    def window(self) -> tuple[float, float]:
        """The rollout window, the same for every mode: from the first revision until the last
        one created could have finished its canary steps."""
        return self.start_s, self.start_s + self.spread_s + len(self.steps) * self.step_s


def bucket(name: str, session: str) -> int:
    """The engine's sticky bucket of a session for an adapter name (the shared contract)."""
    return int(hashlib.sha256(f"{name}\0{session}".encode()).hexdigest()[:8], 16) % BUCKETS


def choose(revisions: list[tuple[int, float]], b: int) -> int:
    """The revision whose buckets hold `b`; `revisions` newest first, percents summing to 100."""
    edge = 0.0
    for number, percent in revisions:
        edge += percent * BUCKETS / 100
        if b < edge:
            return number
    return next(n for n, p in revisions if p > 0)  # float rounding at the last bucket


class RolloutSimulation(ElasticSimulation):
    def __init__(self, trace: Trace, spec: FleetWorkload, rcfg: ReplicaConfig, replicas: int, prule: PlacementRule,
                 policy: Policy, cost: StepCost, rule: RolloutRule, seed: int = 0, strict: bool = False,
                 scrape_interval_s: float = 0.05, warmup_s: float = 60.0):
        super().__init__(trace, spec, rcfg, ScaleRule(mode="fixed", replicas=replicas), prule, policy, cost,
                         seed=seed, strict=strict, scrape_interval_s=scrape_interval_s, warmup_s=warmup_s)
        self.rule = rule
        n = spec.num_adapters
        self.revs: list[list[tuple[int, float]]] = [[(1, 100.0)] for _ in range(n)]  # newest first
        rng = np.random.default_rng([seed, 23])  # its own stream: every mode sees the same revisions
        chosen = rng.permutation(n)[: n if rule.adapters is None else rule.adapters]
        times = rule.start_s + rng.uniform(0.0, rule.spread_s, len(chosen))
        self.revision_at = {int(a): float(t) for a, t in zip(chosen, times)}
        srng = np.random.default_rng([seed, 29])
        self.session = srng.integers(rule.sessions, size=len(trace))
        self.buckets: dict[tuple[int, int], int] = {}
        self.pending: dict[int, float] = {}  # adapter -> when its new revision appeared (warming)
        self.shift_delay: list[float] = []  # seconds from a revision's creation to its first traffic
        self.served: dict[tuple[int, int], int] = {}  # (adapter, session) -> last revision served
        self.flips_back = self.switched = self.rekeyed = self.rewarms = 0
        self.loads: dict[str, list[float]] = self.loads | {"request_new_placed": [], "request_new_other": [],
                                                           "prefetch": [], "request": []}
        self.was_warm: dict[int, set[int]] = {}  # adapter -> pods where it was resident when revision 2 appeared
        self.new_loads: list[tuple[float, int, str, str]] = []  # (t, pod, key, cause) of revisions > 1
        # (pod, adapter) -> (its first request after the revision time, "resident" | "loading" | "cold"
        # when it arrived, the pod is placed, the adapter was resident there at the revision time)
        self.first: dict[tuple[int, int], tuple[SimRequest, str, bool, bool]] = {}
        self.overlap: list[tuple[float, int, int]] = []  # (t, adapters with both revisions resident, max per pod)

    # ---- revisions --------------------------------------------------------------------------

    def _key(self, a: int, number: int) -> str:
        return revision_key(self.names[a], number)

    def _placed_ready(self, a: int) -> list[int]:
        return [p for p in self.placement.placed[a] if self.pods[p].state == "ready"]

    def _new_revision(self, now: float, a: int) -> None:
        old, new = self._key(a, 1), self._key(a, 2)
        self.was_warm[a] = {pod.id for pod in self._live() if pod.replica.warm(old)}
        if self.rule.mode == "none":
            return
        if self.rule.mode == "in-place":
            self.revs[a] = [(2, 100.0)]
            for pod in self._live():
                moved = pod.replica.replace(old, new, now)
                self.rekeyed += len(moved)
                if moved:  # the first requests the new weights serve there: they wait for its load
                    self.first[(pod.id, a)] = (moved[0], "cold", pod.id in self.placement.placed[a],
                                               pod.id in self.was_warm[a])
            return
        self.revs[a] = [(2, 0.0), (1, 100.0)]  # in the manifest, loaded, not yet picked
        self.pending[a] = now
        for p in self._warm_on(a):
            self.pods[p].replica.prefetch(new, now)

    def _warm_on(self, a: int) -> list[int]:
        """The pods that load a new revision ahead, and that the shift waits for."""
        if self.rule.mode == "warm-resident":
            return [p for p in self.ready if p in self.was_warm[a]]
        return self._placed_ready(a)

    def _check(self, now: float, _) -> None:
        """The operator's pass: shift each warming revision that is resident on all its placed pods."""
        for a, created in list(self.pending.items()):
            new = self._key(a, 2)
            cold = [p for p in self._warm_on(a) if not self.pods[p].replica.warm(new)]
            if cold:
                for p in cold:  # the host LRU dropped it before the shift: load it again
                    if new not in self.pods[p].replica.loading:
                        self.rewarms += 1
                        self.pods[p].replica.prefetch(new, now)
                continue
            del self.pending[a]
            self.shift_delay.append(now - created)
            self._step(now, (a, 0))
        if now < self.spec.duration_s:
            self.at(now + self.rule.check_s, self._check, None)

    def _step(self, now: float, arg: tuple[int, int]) -> None:
        """Move adapter a's new revision to its step'th percent (warm: straight to 100)."""
        a, step = arg
        percent = self.rule.steps[step] if self.rule.mode == "canary" else 100.0
        if percent >= 100:
            self.revs[a] = [(2, 100.0)]
            for pod in self._live():  # revision 1 leaves the manifest; its requests finish on it
                pod.replica.retire(self._key(a, 1))
            return
        self.revs[a] = [(2, percent), (1, 100.0 - percent)]
        self.at(now + self.rule.step_s, self._step, (a, step + 1))

    def _serving(self, a: int) -> list[str]:
        """The keys a pod should hold for adapter a: those with traffic, and one warming."""
        keys = [self._key(a, n) for n, p in self.revs[a] if p > 0]
        return keys + ([self._key(a, 2)] if a in self.pending else [])

    # ---- the fleet's hooks, revision-aware ----------------------------------------------------

    def _warm(self, a: int, pid: int) -> bool:
        return self.pods[pid].state != "gone" and any(self.pods[pid].replica.warm(k) for k in self._serving(a))

    def _prefetch(self, additions, now: float) -> None:
        for a, pid in additions:
            pod = self.pods[pid]
            for key in self._serving(a):
                if pod.state in ("warming", "ready") and not pod.replica.warm(key):
                    self.events_log["prefetch"] += 1
                    pod.replica.prefetch(key, now)

    def _scrape(self, now: float, arg) -> None:
        super()._scrape(now, arg)
        for pid in self.ready:  # routers see adapter names (the engine's router metrics), never x@n
            v = self.views[pid]
            v.running_adapters, v.waiting_adapters, v.resident_adapters = (
                frozenset(split_revision(k)[0] for k in s)
                for s in (v.running_adapters, v.waiting_adapters, v.resident_adapters))

    def load_started(self, replica: Replica, adapter: str, cause: str, now: float) -> None:
        self.loads[cause].append(now)
        name, number = split_revision(adapter)
        if number and number > 1:
            self.new_loads.append((now, replica.index, adapter, cause))
        if cause == "request" and number and number > 1:
            placed = replica.index in self.placement.placed[self.index[name]]
            self.loads["request_new_placed" if placed else "request_new_other"].append(now)

    def _arrive(self, i: int) -> None:
        t = self.trace
        a, s = int(t.adapter[i]), int(self.session[i])
        b = self.buckets.get((a, s))
        if b is None:
            b = self.buckets[(a, s)] = bucket(self.names[a], f"user-{s}")
        number = choose(self.revs[a], b)
        last = self.served.get((a, s))
        if last is not None and number != last:
            self.switched += 1
            self.flips_back += number < last
        self.served[(a, s)] = number
        req = SimRequest(i, self._key(a, number), int(t.prompt_len[i]), int(t.output_len[i]), float(t.arrival[i]))
        self.requests.append(req)
        self.placement.note_request(a)
        self.in_flight += 1
        self.last_active = req.arrival
        self._route(req, req.arrival)

    def _route(self, req: SimRequest, now: float) -> None:
        views = [self.views[i] for i in self.ready]
        name, number = split_revision(req.adapter)
        pid = self.ready[self.policy.pick(name, views)]
        self.views[pid].in_flight += 1
        r, a = self.replicas[pid], self.index[name]
        if a in self.was_warm and (pid, a) not in self.first:
            state = "resident" if r.warm(req.adapter) else "loading" if req.adapter in r.loading else "cold"
            self.first[(pid, a)] = (req, state, pid in self.placement.placed[a], pid in self.was_warm[a])
        r.add(req, now)

    def _sample(self, now: float, _) -> None:
        total = most = 0
        for pod in self._live():
            r = pod.replica
            keys = set(r.host) | set(r.slot_of)
            both = sum(1 for k in keys if split_revision(k)[1] == 2 and revision_key(split_revision(k)[0], 1) in keys)
            total, most = total + both, max(most, both)
        self.overlap.append((now, total, most))
        if now < self.spec.duration_s:
            self.at(now + self.rule.sample_s, self._sample, None)

    def run(self) -> dict:
        for a, t in self.revision_at.items():  # `none` too: it records the same (pod, adapter) pairs
            self.at(t, self._new_revision, a)
        if self.rule.mode != "none":
            self.at(self.rule.start_s, self._check, None)
        self.at(0.0, self._sample, None)
        return super().run()

    def check_end(self) -> None:
        super().check_end()
        if self.pending:
            raise AssertionError(f"{len(self.pending)} revisions never warm on their placed pods")
        if self.flips_back:
            raise AssertionError(f"{self.flips_back} sessions went back to an older revision")

    # ---- results ----------------------------------------------------------------------------

    def metrics(self, wall_s: float) -> dict:
        m = super().metrics(wall_s)
        lo, hi = self.rule.window
        arrival = np.array([q.arrival for q in self.requests])
        ttft = np.array([q.first_token - q.arrival for q in self.requests])
        inside = (arrival >= lo) & (arrival < hi)
        before = (arrival >= self.fleet.warmup_s) & (arrival < lo)
        firsts = list(self.first.values())
        first_ttft = np.array([q.first_token - q.arrival for q, *_ in firsts])
        hot_ttft = np.array([q.first_token - q.arrival for q, _, _, w in firsts if w])  # warm there at the revision

        def count(key: str) -> int:
            return int(sum(lo <= t < hi for t in self.loads[key]))

        peak = max(self.overlap, key=lambda x: x[1]) if self.overlap else (0.0, 0, 0)
        in_win = [x for x in self.overlap if lo <= x[0] < hi]
        return m | {
            "rollout_window_s": [lo, hi],
            "revisions_created": 0 if self.rule.mode == "none" else len(self.revision_at),
            "ttft_rollout_p50_s": _q(ttft[inside], 0.5), "ttft_rollout_p99_s": _q(ttft[inside], 0.99),
            "ttft_rollout_mean_s": float(ttft[inside].mean()) if inside.any() else float("nan"),
            "ttft_before_p50_s": _q(ttft[before], 0.5), "ttft_before_p99_s": _q(ttft[before], 0.99),
            "requests_rollout_window": int(inside.sum()),
            "disk_loads_rollout": count("disk"),
            "request_loads_rollout": count("request"),
            "prefetch_loads_rollout": count("prefetch"),
            "request_loads_new_placed": len(self.loads["request_new_placed"]),
            "request_loads_new_other": len(self.loads["request_new_other"]),
            "first_requests": len(firsts),
            "first_requests_placed": sum(1 for _, _, p, _ in firsts if p),
            "first_cold_placed": sum(1 for _, s, p, _ in firsts if p and s != "resident"),
            "first_cold_other": sum(1 for _, s, p, _ in firsts if not p and s != "resident"),
            "first_cold_was_warm": sum(1 for _, s, _, w in firsts if w and s != "resident"),
            "first_cold_was_warm_placed": sum(1 for _, s, p, w in firsts if p and w and s != "resident"),
            "first_ttft_p50_s": _q(first_ttft, 0.5), "first_ttft_p99_s": _q(first_ttft, 0.99),
            "first_ttft_mean_s": float(first_ttft.mean()) if len(first_ttft) else float("nan"),
            "first_was_warm": len(hot_ttft),
            "first_was_warm_ttft_p50_s": _q(hot_ttft, 0.5), "first_was_warm_ttft_p99_s": _q(hot_ttft, 0.99),
            "first_was_warm_ttft_mean_s": float(hot_ttft.mean()) if len(hot_ttft) else float("nan"),
            "shift_delay_p50_s": _q(np.array(self.shift_delay), 0.5),
            "shift_delay_max_s": max(self.shift_delay, default=float("nan")),
            "revisions_never_shifted": len(self.pending),
            "rewarms": self.rewarms, "rekeyed_requests": self.rekeyed,
            "sessions_switched": self.switched, "sessions_flipped_back": self.flips_back,
            "overlap_peak_adapters": int(peak[1]), "overlap_peak_t_s": float(peak[0]),
            "overlap_peak_bytes": int(peak[1]) * self.rule.adapter_bytes,
            "overlap_peak_pod_adapters": max((x[2] for x in self.overlap), default=0),
            "overlap_peak_pod_bytes": max((x[2] for x in self.overlap), default=0) * self.rule.adapter_bytes,
            "overlap_mean_bytes_rollout": float(np.mean([x[1] for x in in_win]) * self.rule.adapter_bytes)
            if in_win else 0.0,
        }


def _q(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.quantile(x, q)) if len(x) else float("nan")


def simulate_rollout(spec: FleetWorkload, trace: Trace, rcfg: ReplicaConfig, replicas: int, prule: PlacementRule,
                     policy: Policy, cost: StepCost, rule: RolloutRule, seed: int = 0, strict: bool = False,
                     warmup_s: float = 60.0, scrape_interval_s: float = 0.05) -> tuple[dict, RolloutSimulation]:
    sim = RolloutSimulation(trace, spec, rcfg, replicas, prule, policy, cost, rule, seed=seed, strict=strict,
                            scrape_interval_s=scrape_interval_s, warmup_s=warmup_s)
    out = sim.run()
    out["config"] = {"rollout": asdict(rule), "placement": asdict(prule), "policy": policy.name, "replicas": replicas}
    return out, sim
