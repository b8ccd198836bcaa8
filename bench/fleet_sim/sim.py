"""The discrete-event fleet simulation: a router in front of N replicas, one event queue.

Events are (time, sequence number, callback, argument) in a heap; arrivals come from the trace
in order. A policy that reads engine state (the EPP) sees it as of the last scrape, every
`scrape_interval_s`; every policy sees its own in-flight counts live (a router counts what it
sent). All randomness comes from the seed: the same seed gives the same numbers.

Metrics are taken over a measurement window, [warmup_s, workload duration): requests that
arrive in it, loads that happen in it. Definitions (the real loopback run uses the same ones):
- throughput: requests, and output tokens, of the requests that finish inside the window,
  per second of the window;
- TTFT: first token time minus arrival, for requests that arrive in the window;
- cold loads/s: disk -> host adapter loads per second in the window, all replicas;
- warm-hit rate: 1 - (host -> device placements in the window) / (requests arriving in it):
  the share of requests that did not need their adapter copied into a device slot;
- TPOT: (last token - first token) / (tokens - 1), averaged: the step time running requests see.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from bench.fleet_sim.cost import StepCost
from bench.fleet_sim.policies import Policy, PodView
from bench.fleet_sim.replica import Replica, ReplicaConfig, SimRequest
from bench.fleet_sim.workload import FleetWorkload, Trace


@dataclass(frozen=True)
class FleetConfig:
    replicas: int
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    scrape_interval_s: float = 0.05  # the EPP refreshes pod metrics every 50 ms by default
    warmup_s: float = 30.0


def adapter_name(i: int) -> str:
    return f"lora-{i:05d}"


class Simulation:
    def __init__(self, trace: Trace, spec: FleetWorkload, fleet: FleetConfig, policy: Policy, cost: StepCost,
                 seed: int = 0, strict: bool = False, names: list[str] | None = None):
        self.names = names  # adapter id -> name (the real run's names, so hashing policies agree)
        self.trace, self.spec, self.fleet, self.policy, self.cost, self.strict = trace, spec, fleet, policy, cost, strict
        rng = np.random.default_rng(seed)
        self.replicas = [Replica(i, fleet.replica, cost, np.random.default_rng(rng.integers(2**63)), self)
                         for i in range(fleet.replicas)]
        self.views = [PodView(max_lora=fleet.replica.device_slots) for _ in self.replicas]
        self.events: list = []
        self._seq = 0
        self.now = 0.0
        self.loads: dict[str, list[float]] = {"disk": [], "device": []}
        self.requests: list[SimRequest] = []
        self.finish_count = np.zeros(len(trace), dtype=np.int64)

    # ---- the engine room ------------------------------------------------------------------

    def at(self, t: float, fn, arg) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, fn, arg))

    def count_load(self, tier: str, now: float) -> None:
        self.loads[tier].append(now)

    def load_started(self, replica: Replica, adapter: str, cause: str, now: float) -> None:
        """A disk -> host load of `adapter` starts on `replica`; cause: "request" (a request needs
        it) or "prefetch" (loaded ahead of any request). The rollout scenario counts them here."""

    def on_loaded(self, replica: Replica, adapter: str, now: float) -> None:
        """A disk -> host load finished on `replica` (the elastic fleet tracks warm-ups here)."""

    def finished(self, req: SimRequest, now: float) -> None:
        self.finish_count[req.idx] += 1
        self.views[req.replica].in_flight -= 1

    def _scrape(self, now: float, _) -> None:
        for r, v in zip(self.replicas, self.views):
            v.waiting = len(r.waiting)
            v.kv_usage = r.kv_usage()
            v.running_adapters = r.running_adapters()
            v.waiting_adapters = r.waiting_adapters()
            v.resident_adapters = r.resident_adapters()
        if now < self.spec.duration_s:
            self.at(now + self.fleet.scrape_interval_s, self._scrape, None)

    def _arrive(self, i: int) -> None:
        t = self.trace
        a = int(t.adapter[i])
        req = SimRequest(i, self.names[a] if self.names else adapter_name(a), int(t.prompt_len[i]), int(t.output_len[i]), float(t.arrival[i]))
        self.requests.append(req)
        r = self.policy.pick(req.adapter, self.views)
        self.views[r].in_flight += 1
        self.replicas[r].add(req, req.arrival)

    def run(self) -> dict:
        t0 = time.perf_counter()
        if self.policy.uses_scrape:
            self.at(0.0, self._scrape, None)
        arrivals, n, i = self.trace.arrival, len(self.trace), 0
        while i < n or self.events:
            if i < n and (not self.events or arrivals[i] <= self.events[0][0]):
                self.now = float(arrivals[i])
                self._arrive(i)
                i += 1
                continue
            t, _, fn, arg = heapq.heappop(self.events)
            self.now = t
            fn(t, arg)
        if self.strict:
            self.check_end()
        return self.metrics(time.perf_counter() - t0)

    def check_end(self) -> None:
        """Conservation: every request finished exactly once, with all its tokens; nothing left."""
        if len(self.requests) != len(self.trace):
            raise AssertionError(f"{len(self.requests)} requests routed of {len(self.trace)}")
        if not (self.finish_count == 1).all():
            bad = np.flatnonzero(self.finish_count != 1)[:5]
            raise AssertionError(f"requests not finished exactly once: {bad.tolist()}")
        for req in self.requests:
            if req.generated != req.output_len or req.first_token is None or not req.arrival <= req.first_token <= req.finish:
                raise AssertionError(f"request {req.idx}: {req.generated}/{req.output_len} tokens, times out of order")
        for r, v in zip(self.replicas, self.views):
            if r.running or r.waiting or v.in_flight != 0 or sum(r.slot_pins) != 0:
                raise AssertionError(f"replica {r.index} not drained")

    # ---- results --------------------------------------------------------------------------

    def metrics(self, wall_s: float) -> dict:
        lo, hi = self.fleet.warmup_s, self.spec.duration_s
        return window_metrics(
            arrivals=np.array([q.arrival for q in self.requests]),
            first=np.array([q.first_token for q in self.requests], dtype=float),
            finish=np.array([q.finish for q in self.requests], dtype=float),
            out_tokens=np.array([q.generated for q in self.requests]),
            replica=np.array([q.replica for q in self.requests]),
            disk_loads=np.array(self.loads["disk"]), device_loads=np.array(self.loads["device"]),
            lo=lo, hi=hi, num_replicas=len(self.replicas),
        ) | {"sim_wall_s": round(wall_s, 2), "steps": sum(r.steps for r in self.replicas)}


def window_metrics(arrivals, first, finish, out_tokens, replica, disk_loads, device_loads, lo: float, hi: float,
                   num_replicas: int, errors: int = 0) -> dict:
    """The report's numbers from per-request times and load timestamps (shared with the real run)."""
    span = hi - lo
    inside = (arrivals >= lo) & (arrivals < hi)
    done = (finish >= lo) & (finish < hi)
    ttft = (first - arrivals)[inside]
    ttft = ttft[np.isfinite(ttft)]
    multi = inside & (out_tokens > 1) & np.isfinite(finish) & np.isfinite(first)
    tpot = (finish - first)[multi] / (out_tokens[multi] - 1)  # the step time a running request sees
    n_in = int(inside.sum())
    device = int(((device_loads >= lo) & (device_loads < hi)).sum())
    per_replica = np.bincount(replica[inside], minlength=num_replicas) if n_in else np.zeros(num_replicas)
    return {
        "requests_in_window": n_in,
        "throughput_req_s": float(done.sum() / span),
        "throughput_tok_s": float(out_tokens[done].sum() / span),
        "ttft_p50_s": float(np.quantile(ttft, 0.5)) if len(ttft) else float("nan"),
        "ttft_p99_s": float(np.quantile(ttft, 0.99)) if len(ttft) else float("nan"),
        "ttft_mean_s": float(ttft.mean()) if len(ttft) else float("nan"),
        "tpot_mean_s": float(tpot.mean()) if len(tpot) else float("nan"),
        "cold_loads_per_s": float(((disk_loads >= lo) & (disk_loads < hi)).sum() / span),
        "device_loads_per_s": float(device / span),
        "warm_hit_rate": float(1 - device / n_in) if n_in else float("nan"),
        "replica_load_max_over_mean": float(per_replica.max() / per_replica.mean()) if n_in else float("nan"),
        "errors": errors,
    }


def simulate(spec: FleetWorkload, trace: Trace, fleet: FleetConfig, policy: Policy, cost: StepCost, seed: int = 0,
             strict: bool = False) -> dict:
    sim = Simulation(trace, spec, fleet, policy, cost, seed=seed, strict=strict)
    out = sim.run()
    out["config"] = {"replicas": fleet.replicas, "policy": policy.name, **asdict(fleet.replica),
                     "scrape_interval_s": fleet.scrape_interval_s, "warmup_s": fleet.warmup_s}
    return out
