"""Routing policies: which replica gets a request for an adapter.

One code path for the simulator and for the real loopback run: a policy sees a `PodView` per
replica (what a router can know) and returns an index. The simulator fills the views from its
model; the real run fills them from the engines' /metrics and /v1/adapters and from the
client's own count of requests in flight.

Policies:
- `random`: uniform over replicas.
- `least-load`: the fewest requests in flight, as counted by the router itself (Envoy's
  LEAST_REQUEST over all hosts rather than two random choices).
- `gie`: the Gateway API Inference Extension endpoint picker (EPP), modelled on its source,
  kubernetes-sigs/gateway-api-inference-extension:
  - `queue-scorer` (pkg/epp/scheduling/framework/plugins/scorer/queue.go): min-max normalised
    waiting queue, (max - q) / (max - min), and 1.0 for every pod when all queues are equal;
  - `kv-cache-utilization-scorer` (.../plugins/kvcacheutilizationscorer/kvcache_utilization.go):
    1 - KV cache usage;
  - `lora-affinity-scorer` (.../plugins/loraaffinityscorer/lora_affinity.go): 1.0 when the
    adapter is in the pod's ActiveModels; 0.8 when len(Active) + len(Waiting) < MaxActiveModels
    (room to load one more); 0.6 when it is in WaitingModels; 0 otherwise. ActiveModels and
    WaitingModels come from vLLM's `vllm:lora_requests_info{running_lora_adapters,
    waiting_lora_adapters,max_lora}`: the adapters of running and of waiting requests;
  - the scores are summed with weights and `max-score-picker` (.../plugins/picker/
    max_score_picker.go) takes the highest, ties broken at random (it shuffles, then sorts
    stably).
  Weights: the chart's default profile (config/charts/inferencepool/templates/epp-config.yaml)
  is queue 2, kv-cache-utilization 2, prefix-cache 3; the LoRA recipes add lora-affinity (1 in
  llm-d's, 3 in others). The prefix-cache scorer is left out: the prompts here share no prefix,
  so it scores every pod alike. Default: queue 2, kv 2, lora-affinity 1.
  The EPP reads pod metrics on a refresh interval, so its view is as old as the last scrape.
- `gie-resident`: the same scorers, but ActiveModels is the set of adapters resident in the
  pod's device slots, which loraplex lists at /v1/adapters (state "device") and vLLM does not
  publish. WaitingModels stays the adapters of waiting requests.
- `chwbl`: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018),
  the scheme of KubeAI's PrefixHash load balancer: the adapter name hashes onto a ring of
  `vnodes` points per replica; walking clockwise, the first replica whose in-flight count + 1
  is within ceil(load_factor * (total in flight + 1) / replicas) gets it.
- `placed`: follows the operator's warm placement (placement.py): the adapter's placed pods
  that are ready, the one with the fewest requests in flight, under the same load bound as
  `chwbl`; past the bound, or with no placed pod ready, the adapter's rendezvous order over
  the ready pods, first pod under the bound. What a placement-aware endpoint picker would do
  (the EPP's lora-affinity scorer fed with the placement instead of the running adapters).

The elastic fleet (fleet.py) routes over its ready pods only: a view's `pod_id` names the pod,
so the hashing policies keep each pod's ring points while pods come and go.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import dataclass, field

POLICIES = ("random", "least-load", "gie", "gie-resident", "chwbl")
ELASTIC_POLICIES = POLICIES + ("placed",)


@dataclass
class PodView:
    """What a router knows about one replica when it routes a request."""

    waiting: int = 0  # scraped: requests queued, not yet running
    kv_usage: float = 0.0  # scraped: 0..1
    running_adapters: frozenset = frozenset()  # scraped: adapters with running requests
    waiting_adapters: frozenset = frozenset()  # scraped: adapters with waiting requests
    resident_adapters: frozenset = frozenset()  # scraped: adapters in device slots (loraplex only)
    max_lora: int = 8  # device slots
    in_flight: int = 0  # router-local: sent there, not finished
    pod_id: int = -1  # the pod's identity when pods come and go (-1: its index in the list)


class Policy:
    name = ""
    uses_scrape = False  # True: needs scraped engine state (metrics, adapter lists)

    def pick(self, adapter: str, views: list[PodView]) -> int:
        raise NotImplementedError


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, adapter, views):
        return self.rng.randrange(len(views))


class LeastLoadPolicy(Policy):
    name = "least-load"

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, adapter, views):
        low = min(v.in_flight for v in views)
        return self.rng.choice([i for i, v in enumerate(views) if v.in_flight == low])


def lora_affinity_score(adapter: str, active: frozenset, waiting: frozenset, max_lora: int) -> float:
    """lora-affinity-scorer's Score, case for case (lora_affinity.go)."""
    if adapter in active:
        return 1.0
    if len(active) + len(waiting) < max_lora:
        return 0.8
    if adapter in waiting:
        return 0.6
    return 0.0


@dataclass
class GiePolicy(Policy):
    rng: random.Random
    queue_weight: float = 2.0
    kv_weight: float = 2.0
    lora_weight: float = 1.0
    resident: bool = False  # gie-resident: ActiveModels = adapters in device slots
    uses_scrape = True

    @property
    def name(self) -> str:
        return "gie-resident" if self.resident else "gie"

    def scores(self, adapter: str, views: list[PodView]) -> list[float]:
        qs = [v.waiting for v in views]
        qmin, qmax = min(qs), max(qs)
        out = []
        for v in views:
            queue = 1.0 if qmax == qmin else (qmax - v.waiting) / (qmax - qmin)
            kv = 1.0 - v.kv_usage
            active = v.resident_adapters if self.resident else v.running_adapters
            lora = lora_affinity_score(adapter, active, v.waiting_adapters, v.max_lora)
            out.append(self.queue_weight * queue + self.kv_weight * kv + self.lora_weight * lora)
        return out

    def pick(self, adapter, views):
        scores = self.scores(adapter, views)
        best = max(scores)
        return self.rng.choice([i for i, s in enumerate(scores) if s == best])


@dataclass
class ChwblPolicy(Policy):
    num_replicas: int
    load_factor: float = 1.25
    vnodes: int = 100
    name: str = "chwbl"
    _ids: tuple = field(default=(), repr=False)
    _ring: list = field(default_factory=list, repr=False)
    _owners: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        self._build(tuple(range(self.num_replicas)))

    def _build(self, ids: tuple) -> None:
        """Ring points of the pods `ids`; an owner is the pod's position in the views list."""
        points = sorted((_hash(f"replica-{r}#{v}"), k) for k, r in enumerate(ids) for v in range(self.vnodes))
        self._ids, self._ring, self._owners = ids, [p for p, _ in points], [k for _, k in points]

    def pick(self, adapter, views):
        ids = tuple(v.pod_id if v.pod_id >= 0 else i for i, v in enumerate(views))
        if ids != self._ids:
            self._build(ids)
        total = sum(v.in_flight for v in views)
        bound = math.ceil(self.load_factor * (total + 1) / len(views))
        start = bisect.bisect(self._ring, _hash(adapter)) % len(self._ring)
        for k in range(len(self._ring)):
            r = self._owners[(start + k) % len(self._ring)]
            if views[r].in_flight + 1 <= bound:
                return r
        return self._owners[start]  # unreachable: some replica is always at or below the mean


@dataclass
class PlacedPolicy(Policy):
    """Needs `placement` (placement.Placement) and `index` (adapter name -> id) set by the fleet."""

    load_factor: float = 1.25
    name: str = "placed"
    placement: object = None
    index: dict = field(default_factory=dict, repr=False)

    def pick(self, adapter, views):
        a = self.index[adapter]
        total = sum(v.in_flight for v in views)
        bound = math.ceil(self.load_factor * (total + 1) / len(views))
        at = {v.pod_id: i for i, v in enumerate(views)}
        placed = [at[p] for p in self.placement.placed[a] if p in at]
        if placed:
            best = min(placed, key=lambda i: views[i].in_flight)
            if views[best].in_flight + 1 <= bound:
                return best
        for p in self.placement.ranking(a, list(at)):
            if views[at[p]].in_flight + 1 <= bound:
                return at[p]
        return min(range(len(views)), key=lambda i: views[i].in_flight)


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def make_policy(name: str, num_replicas: int, seed: int, gie_weights: tuple[float, float, float] = (2.0, 2.0, 1.0)) -> Policy:
    rng = random.Random(seed)
    if name == "random":
        return RandomPolicy(rng)
    if name == "least-load":
        return LeastLoadPolicy(rng)
    if name in ("gie", "gie-resident"):
        q, kv, lora = gie_weights
        return GiePolicy(rng, q, kv, lora, resident=name == "gie-resident")
    if name == "chwbl":
        return ChwblPolicy(num_replicas)
    if name == "placed":
        return PlacedPolicy()
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(ELASTIC_POLICIES)}")
