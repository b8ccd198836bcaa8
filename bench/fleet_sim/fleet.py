"""The elastic fleet: pods that start, warm, serve, drain and go, under an autoscaler and a
warm placement; GPU-hours are the integral of the pods that exist.

Fleet modes (ScaleRule.mode):
- `fixed`: `replicas` pods for the whole run, all ready at t = 0.
- `hpa`: the operator's autoscaler, its own decision function (loraplex.operator.autoscale.
  decide: per-pod average of `metric` over the Ready pods against `target`, 10 % tolerance,
  the up and down stabilization windows, [min, max]) every `interval_s`.
- `zero`: `hpa` above one pod, plus scale to zero as KEDA's HTTP add-on does it: no request
  in flight or arriving for `idle_s` (its scaledownPeriod) and the fleet goes to 0 pods; a
  request that arrives then is held at the gateway (the interceptor) while one pod starts.

A pod's life:
1. created: it costs GPU time from now on; for `pod_start_s + model_load_s` it starts (the
   pod's scheduling and container start, stated; the engine's start, measured by
   measure.py: the model read and the caches allocated);
2. warming: it loads its placed adapters that have had traffic, hottest first, at most as
   many as its host tier holds, for at most `warm_budget_s`; it is not Ready meanwhile;
3. ready: the router may pick it; held requests go out at once;
4. draining (a scale-down): no new requests; deleted when its last request finishes.
A scale-down takes pods that are not Ready first, then the newest Ready ones (a ReplicaSet's
preference). The placement (placement.py) sees pods from creation to the start of draining.

Metrics beside sim.window_metrics': GPU-hours in the window, mean and peak pods, pods created
(cold starts), scale-from-zero events, the time requests were held at the gateway, cold
(disk -> host) loads per minute, prefetch loads, placement changes; and the pod count over time.
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field

import numpy as np
from loraplex.operator.autoscale import Policy as HpaPolicy
from loraplex.operator.autoscale import decide

from bench.fleet_sim.cost import StepCost
from bench.fleet_sim.placement import Placement, PlacementRule
from bench.fleet_sim.policies import PlacedPolicy, Policy, PodView
from bench.fleet_sim.replica import Replica, ReplicaConfig, SimRequest
from bench.fleet_sim.sim import FleetConfig, Simulation, adapter_name
from bench.fleet_sim.workload import FleetWorkload, Trace


@dataclass(frozen=True)
class ScaleRule:
    mode: str = "fixed"  # fixed | hpa | zero
    replicas: int = 4  # fixed: the fleet; hpa/zero: maxReplicas
    min_replicas: int = 1  # hpa/zero: minReplicas above zero
    metric: str = "num_requests_running"
    target: float = 8.0
    up_window_s: float = 0.0
    down_window_s: float = 300.0
    interval_s: float = 15.0  # the operator's autoscaleInterval
    idle_s: float = 300.0  # KEDA HTTP add-on scaledownPeriod
    pod_start_s: float = 20.0
    model_load_s: float = 2.0
    warm_budget_s: float = 60.0

    def __post_init__(self):
        if self.mode not in ("fixed", "hpa", "zero"):
            raise ValueError(f"fleet mode {self.mode!r}: fixed, hpa or zero")

    @property
    def cold_start_s(self) -> float:
        return self.pod_start_s + self.model_load_s


@dataclass
class Pod:
    id: int
    replica: Replica
    created: float
    state: str = "starting"  # starting | warming | ready | draining | gone
    ready_at: float | None = None
    deleted: float | None = None
    warming: set = field(default_factory=set)


class ElasticSimulation(Simulation):
    def __init__(self, trace: Trace, spec: FleetWorkload, rcfg: ReplicaConfig, scale: ScaleRule,
                 prule: PlacementRule, policy: Policy, cost: StepCost, seed: int = 0, strict: bool = False,
                 scrape_interval_s: float = 0.05, warmup_s: float = 60.0):
        super().__init__(trace, spec, FleetConfig(replicas=0, replica=rcfg, scrape_interval_s=scrape_interval_s,
                                                  warmup_s=warmup_s), policy, cost, seed=seed, strict=strict)
        self.scale, self.rcfg, self.seed = scale, rcfg, seed
        self.names = [adapter_name(i) for i in range(spec.num_adapters)]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.placement = Placement(prule, self.names)
        if isinstance(policy, PlacedPolicy):
            policy.placement, policy.index = self.placement, self.index
        self.pods: list[Pod] = []
        self.ready: list[int] = []  # ids of ready pods, sorted
        self.held: list[SimRequest] = []  # at the gateway: no ready pod
        self.history: tuple = ()
        self.hpa = HpaPolicy(min_replicas=scale.min_replicas, max_replicas=scale.replicas, metric=scale.metric,
                             target=scale.target, up_window=scale.up_window_s, down_window=scale.down_window_s)
        self.last_active = 0.0
        self.in_flight = 0
        self.timeline: list[tuple[float, int, int]] = []  # (t, pods that exist, ready pods)
        self.events_log = {"created": 0, "from_zero": 0, "to_zero": 0, "prefetch": 0}
        self.held_s: list[float] = []

    # ---- pods -----------------------------------------------------------------------------

    def _create(self, now: float, ready: bool = False) -> Pod:
        pid = len(self.pods)
        rng = np.random.default_rng([self.seed, 7, pid])
        pod = Pod(pid, Replica(pid, self.rcfg, self.cost, rng, self), now)
        self.pods.append(pod)
        self.replicas.append(pod.replica)
        self.views.append(PodView(max_lora=self.rcfg.device_slots, pod_id=pid))
        if ready:
            self._ready(now, pid)
        else:
            self.events_log["created"] += 1
            self.at(now + self.scale.cold_start_s, self._started, pid)
        return pod

    def _started(self, now: float, pid: int) -> None:
        pod = self.pods[pid]
        if pod.state != "starting":
            return
        pod.state = "warming"
        hottest = self.placement.on_pod(pid)[: self.rcfg.host_slots]
        for a in hottest:
            pod.warming.add(self.names[a])
            pod.replica.prefetch(self.names[a], now)
        if pod.warming:
            self.at(now + self.scale.warm_budget_s, self._warm_deadline, pid)
        else:
            self._ready(now, pid)

    def on_loaded(self, replica: Replica, adapter: str, now: float) -> None:
        pod = self.pods[replica.index] if replica.index < len(self.pods) else None
        if pod is not None and pod.state == "warming":
            pod.warming.discard(adapter)
            if not pod.warming:
                self._ready(now, pod.id)

    def _warm_deadline(self, now: float, pid: int) -> None:
        if self.pods[pid].state == "warming":
            self._ready(now, pid)

    def _ready(self, now: float, pid: int) -> None:
        pod = self.pods[pid]
        pod.state, pod.ready_at = "ready", now
        bisect.insort(self.ready, pid)
        self._mark(now)
        held, self.held = self.held, []
        for req in held:
            self.held_s.append(now - req.arrival)
            self._route(req, now)

    def _remove(self, now: float, count: int) -> None:
        """Scale down by `count`: pods not Ready first (newest first), then the newest Ready ones."""
        live = [p for p in self.pods if p.state in ("starting", "warming", "ready")]
        order = sorted(live, key=lambda p: (p.state == "ready", -p.id))
        for pod in order[:count]:
            if pod.state == "ready":
                self.ready.remove(pod.id)
            pod.state = "draining"
            self._maybe_delete(now, pod)
        self._placement_changed(now)
        self._mark(now)

    def _maybe_delete(self, now: float, pod: Pod) -> None:
        if pod.state == "draining" and self.views[pod.id].in_flight == 0:
            pod.state, pod.deleted = "gone", now
            self.placement.drop_pod(pod.id)
            self._mark(now)

    def _live(self) -> list[Pod]:
        return [p for p in self.pods if p.state in ("starting", "warming", "ready")]

    def _placement_changed(self, now: float) -> None:
        self._prefetch(self.placement.set_pods([p.id for p in self._live()], now, self._warm), now)

    def _prefetch(self, additions, now: float) -> None:
        for a, pid in additions:
            pod = self.pods[pid]
            if pod.state in ("warming", "ready") and not pod.replica.warm(self.names[a]):
                self.events_log["prefetch"] += 1
                pod.replica.prefetch(self.names[a], now)

    def _warm(self, a: int, pid: int) -> bool:
        return self.pods[pid].state != "gone" and self.pods[pid].replica.warm(self.names[a])

    def _mark(self, now: float) -> None:
        exist = sum(1 for p in self.pods if p.state != "gone")
        self.timeline.append((now, exist, len(self.ready)))

    # ---- control loops --------------------------------------------------------------------

    def _place_tick(self, now: float, _) -> None:
        self._prefetch(self.placement.evaluate(now, self._warm), now)
        if now < self.spec.duration_s:
            self.at(now + self.placement.rule.interval_s, self._place_tick, None)

    def _scale_tick(self, now: float, _) -> None:
        live = self._live()
        current = len(live)
        if self.scale.mode == "zero" and current and not self.in_flight and not self.held \
                and now - self.last_active >= self.scale.idle_s:
            self.events_log["to_zero"] += 1
            self.history = ()
            self._remove(now, current)
        elif current:
            ready = [self.pods[i].replica for i in self.ready]
            if self.scale.metric == "num_requests_waiting":
                samples = [float(len(r.waiting)) for r in ready]
            else:
                samples = [float(len(r.running)) for r in ready]
            if not self.history:  # as a fresh operator does: no scale-down before a whole window
                self.history = ((now, current),)
            d = decide(current, samples, self.hpa, self.history, now)
            self.history = d.history
            if d.desired > current:
                for _ in range(d.desired - current):
                    self._create(now)
                self._placement_changed(now)
                self._mark(now)
            elif d.desired < current:
                self._remove(now, current - d.desired)
        if now < self.spec.duration_s:
            self.at(now + self.scale.interval_s, self._scale_tick, None)

    # ---- requests -------------------------------------------------------------------------

    def _scrape(self, now: float, _) -> None:
        for pid in self.ready:
            r, v = self.replicas[pid], self.views[pid]
            v.waiting, v.kv_usage = len(r.waiting), r.kv_usage()
            v.running_adapters, v.waiting_adapters = r.running_adapters(), r.waiting_adapters()
            v.resident_adapters = r.resident_adapters()
        if now < self.spec.duration_s:
            self.at(now + self.fleet.scrape_interval_s, self._scrape, None)

    def _arrive(self, i: int) -> None:
        t = self.trace
        a = int(t.adapter[i])
        req = SimRequest(i, self.names[a], int(t.prompt_len[i]), int(t.output_len[i]), float(t.arrival[i]))
        self.requests.append(req)
        self.placement.note_request(a)
        self.in_flight += 1
        self.last_active = req.arrival
        if not self.ready:
            self.held.append(req)
            if not self._live():  # at zero: the interceptor asks for a pod
                self.events_log["from_zero"] += 1
                self.history = ()
                self._create(req.arrival)
                self._placement_changed(req.arrival)
                self._mark(req.arrival)
            return
        self._route(req, req.arrival)

    def _route(self, req: SimRequest, now: float) -> None:
        views = [self.views[i] for i in self.ready]
        pid = self.ready[self.policy.pick(req.adapter, views)]
        self.views[pid].in_flight += 1
        self.replicas[pid].add(req, now)

    def finished(self, req: SimRequest, now: float) -> None:
        super().finished(req, now)
        self.in_flight -= 1
        self.last_active = now
        self._maybe_delete(now, self.pods[req.replica])

    def run(self) -> dict:
        start = self.scale.replicas if self.scale.mode == "fixed" else max(1, self.scale.min_replicas)
        for _ in range(start):
            self._create(0.0, ready=True)
        self._placement_changed(0.0)
        self.at(self.placement.rule.interval_s, self._place_tick, None)
        if self.scale.mode != "fixed":
            self.at(self.scale.interval_s, self._scale_tick, None)
        return super().run()

    def check_end(self) -> None:
        super().check_end()
        if self.held:
            raise AssertionError(f"{len(self.held)} requests still held at the gateway")

    # ---- results --------------------------------------------------------------------------

    def metrics(self, wall_s: float) -> dict:
        m = super().metrics(wall_s)
        lo, hi = self.fleet.warmup_s, self.spec.duration_s
        m.pop("replica_load_max_over_mean", None)  # pods come and go: per-pod shares mean little
        return m | fleet_accounting(self.pods, lo, hi) | {
            "cold_loads_per_min": m["cold_loads_per_s"] * 60,
            "pods_created": self.events_log["created"], "scale_from_zero": self.events_log["from_zero"],
            "scale_to_zero": self.events_log["to_zero"], "prefetch_loads": self.events_log["prefetch"],
            "placement_changes": self.placement.changes,
            "held_requests": len(self.held_s), "held_max_s": max(self.held_s, default=0.0),
            "held_mean_s": float(np.mean(self.held_s)) if self.held_s else 0.0,
        }


def fleet_accounting(pods: list[Pod], lo: float, hi: float) -> dict:
    """GPU-hours = the integral over [lo, hi) of the pods that exist (created, not yet deleted)."""
    seconds, marks = 0.0, []
    for p in pods:
        end = p.deleted if p.deleted is not None else hi
        seconds += max(0.0, min(end, hi) - max(p.created, lo))
        marks += [(p.created, 1), (end, -1)]
    marks.sort()
    peak = cur = 0
    for t, d in marks:  # the most pods at once inside the window
        if t >= hi:
            break
        cur += d
        peak = cur if t < lo else max(peak, cur)  # before lo: the count standing when the window opens
    return {"gpu_hours": seconds / 3600, "mean_pods": seconds / (hi - lo), "peak_pods": peak}


def timeline(sim: ElasticSimulation, step_s: float = 60.0) -> list[list[float]]:
    """[t, pods that exist, ready pods] every step_s, for the plot and the JSON."""
    out, k, last = [], 0, (0, 0)
    events = sim.timeline
    for t in np.arange(0.0, sim.spec.duration_s + step_s, step_s):
        while k < len(events) and events[k][0] <= t:
            last = events[k][1:]
            k += 1
        out.append([float(t), int(last[0]), int(last[1])])
    return out


def simulate_elastic(spec: FleetWorkload, trace: Trace, rcfg: ReplicaConfig, scale: ScaleRule, prule: PlacementRule,
                     policy: Policy, cost: StepCost, seed: int = 0, strict: bool = False, warmup_s: float = 60.0,
                     scrape_interval_s: float = 0.05) -> tuple[dict, ElasticSimulation]:
    sim = ElasticSimulation(trace, spec, rcfg, scale, prule, policy, cost, seed=seed, strict=strict,
                            scrape_interval_s=scrape_interval_s, warmup_s=warmup_s)
    out = sim.run()
    out["config"] = {"scale": asdict(scale), "placement": asdict(prule), "policy": policy.name}
    return out, sim
