"""Warm placement: which engine pods of a base keep which adapter registered and warm.

Pure functions. Every pod can still serve any adapter by loading it just in time from the
engine's default source; placement only decides where the operator pushes an adapter's manifest
(so that it is known, tenant-checked and kept in the pod's cache tiers) and where the inference
gateway's LoRA-affinity scoring then finds it warm.

Two policies, after AIBrix's per-adapter replicas:
- `spread`: rendezvous (highest-random-weight) hashing of (adapter, pod). Deterministic, needs no
  memory, and moves the fewest adapters when pods come and go: adding a pod takes over exactly
  the adapters for which it now ranks in the top N, removing one moves only its own.
- `least-loaded`: keep the adapter where it already is (its placement in status), then fill the
  missing replicas with the pods that hold the fewest adapters, ties broken by the same hash.
  Sticky: it never reshuffles a settled fleet; new pods fill up as adapters arrive or move.

`replicas: all` places an adapter on every pod (preload adapters always are: every pod must have
them resident before it is Ready). `replicas: auto` follows the adapter's request rate between
`min` and `max` pods (demand.py decides the count; `want_of` turns it into a Want).

A change of placement is make-before-break: an adapter leaves a pod it is no longer placed on
only once it is servable on every pod of its new placement (`settled`; sync.py keeps the others
where they are until then), so no change ever leaves it cold on every pod at once.

The decisions (`resolve`, `want_of`, `place`, `by_pod`, `settled`, `placed_on`) are pure;
PlacementMemory keeps the last placement of each adapter between passes (seeded from
status.placement after a restart), and `place_adapters` is the base pass's placement step over it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from . import demand
from . import render
from .adapters import SpecProblem
from .constants import Key

ALL = "all"
AUTO = "auto"
SPREAD = "spread"
LEAST_LOADED = "least-loaded"
POLICIES = (SPREAD, LEAST_LOADED)
DEFAULT_REPLICAS = 2
DEFAULT_POLICY = SPREAD


@dataclass(frozen=True)
class Want:
    """What one adapter asks for: `replicas` (an int, or ALL) under `policy`."""

    name: str
    replicas: int | str = DEFAULT_REPLICAS
    policy: str = DEFAULT_POLICY


def score(adapter: str, pod: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{adapter}\0{pod}".encode(), digest_size=8).digest(), "big")


def ranked(adapter: str, pods: Iterable[str]) -> list[str]:
    """The pods in the adapter's own preference order (highest hash first)."""
    return sorted(pods, key=lambda p: (-score(adapter, p), p))


def count(replicas: int | str, n_pods: int) -> int:
    if replicas == ALL:
        return n_pods
    return max(0, min(int(replicas), n_pods))


@dataclass(frozen=True)
class Spec:
    """An adapter's placement as its spec (over its base's default) asks: `replicas` an int, ALL
    or AUTO (then `auto` holds its bounds and constants), under `policy`."""

    replicas: int | str
    policy: str = DEFAULT_POLICY
    auto: demand.AutoPolicy | None = None


def resolve(spec_placement: Mapping | None, base_default: Mapping | None, preload: bool) -> Spec:
    """The adapter's placement: its own fields, else its base's, else 2/spread. A preload adapter
    is on every pod. Raises SpecProblem (InvalidPlacement) for a value the operator cannot use."""
    merged = {**dict(base_default or {}), **{k: v for k, v in dict(spec_placement or {}).items() if v is not None}}
    replicas = merged.get("replicas", DEFAULT_REPLICAS)
    policy = merged.get("policy", DEFAULT_POLICY)
    if policy not in POLICIES:
        raise SpecProblem("InvalidPlacement", f"placement.policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if replicas == AUTO:
        auto = demand.AutoPolicy.from_spec(merged)
        return Spec(ALL, policy) if preload else Spec(AUTO, policy, auto)
    if replicas != ALL:
        try:
            replicas = int(replicas) if not isinstance(replicas, bool) else 0
        except (TypeError, ValueError):
            replicas = 0
        if replicas < 1:
            raise SpecProblem("InvalidPlacement", "placement.replicas must be a whole number of pods (at least 1), "
                                                  f"\"{ALL}\" or \"{AUTO}\", got {merged.get('replicas')!r}")
    return Spec(ALL if preload else replicas, policy)


def want_of(name: str, spec: Spec, warmth: demand.Warmth | None, placed_now: int,
            said: str | None = None) -> tuple[Want, str | None]:
    """The Want of one adapter, and for an auto one the reason of its count (status.placementReason).
    `warmth`: demand.py's last decision (None before the first, e.g. after a restart); `placed_now`:
    its pods now; `said`: the reason its status gives now (kept while the count stays)."""
    if spec.replicas != AUTO or spec.auto is None:
        return Want(name, spec.replicas, spec.policy), None
    if warmth is None:
        warmth = demand.decide(placed_now or None, None, spec.auto, None, 0.0)
        if said and warmth.count == placed_now:
            warmth = demand.Warmth(warmth.count, said, measured=demand.UNMEASURED not in said)
    count = demand.clamp(warmth.count, spec.auto)
    reason = warmth.reason if count == warmth.count else f"{count} pods: held inside [{spec.auto.min}, {spec.auto.max}]"
    return Want(name, count, spec.policy), reason


def wants_of(specs: Mapping[str, Spec], adapters: Mapping[str, dict], warm: Mapping[str, demand.Warmth],
             n_pods: int | None = None) -> tuple[dict[str, Want], dict[str, str]]:
    """The Wants of a base's accepted adapters (`specs`: name -> Spec; `adapters`: name -> index
    entry; `warm`: demand.py's decisions), and the reasons of the auto adapters' counts (which say
    so when the base has fewer pods than that: `n_pods`)."""
    wants: dict[str, Want] = {}
    reasons: dict[str, str] = {}
    for name, spec in specs.items():
        status = adapters[name].get("status") or {}
        now = len(status.get("placement") or [])
        wants[name], reason = want_of(name, spec, warm.get(name), now, status.get("placementReason"))
        if reason is not None:
            count = wants[name].replicas
            if n_pods is not None and isinstance(count, int) and count > n_pods:
                reason += f" (the base has {n_pods} pod{'s' if n_pods != 1 else ''})"
            reasons[name] = reason
    return wants, reasons


def place(wants: Iterable[Want], pods: Iterable[str],
          previous: Mapping[str, Iterable[str]] | None = None) -> dict[str, list[str]]:
    """adapter name -> the pods it is placed on (sorted). `previous` is the last placement
    (least-loaded keeps it where its pods still exist)."""
    pods = sorted(set(pods))
    previous = previous or {}
    out: dict[str, list[str]] = {}
    load = {p: 0 for p in pods}
    sticky: list[Want] = []
    for w in sorted(wants, key=lambda w: w.name):
        n = count(w.replicas, len(pods))
        if w.policy == LEAST_LOADED and n < len(pods):
            sticky.append(w)
            continue
        chosen = ranked(w.name, pods)[:n]
        out[w.name] = sorted(chosen)
        for p in chosen:
            load[p] += 1
    # least-loaded: first keep what still stands, then fill gaps onto the emptiest pods.
    kept: dict[str, list[str]] = {}
    for w in sticky:
        n = count(w.replicas, len(pods))
        keep = [p for p in previous.get(w.name, ()) if p in load][:n]
        kept[w.name] = keep
        for p in keep:
            load[p] += 1
    for w in sticky:
        n = count(w.replicas, len(pods))
        chosen = list(kept[w.name])
        rank = {p: i for i, p in enumerate(ranked(w.name, pods))}
        while len(chosen) < n:
            p = min((p for p in pods if p not in chosen), key=lambda p: (load[p], rank[p]))
            chosen.append(p)
            load[p] += 1
        out[w.name] = sorted(chosen)
    return out


def by_pod(placement: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """pod -> the adapters placed on it."""
    out: dict[str, set[str]] = {}
    for adapter, pods in placement.items():
        for p in pods:
            out.setdefault(p, set()).add(adapter)
    return out


def settled(placed: Mapping[str, Iterable[str]], servable: Callable[[str, str], bool]) -> set[str]:
    """The adapters servable on every pod of their placement (and placed somewhere): only those
    may leave the pods they are no longer placed on (make-before-break)."""
    out = set()
    for name, where in placed.items():
        where = list(where)
        if where and all(servable(name, p) for p in where):
            out.add(name)
    return out


@dataclass(frozen=True)
class Candidate:
    """An adapter as `placed_on` takes it: what it wants, its request rate, where it is now."""

    want: Want
    rate: float = 0.0
    where: tuple[str, ...] = ()


def placed_on(pod_name: str, pods: Iterable[str], adapters: Iterable[Candidate]) -> list[str]:
    """The adapters that would be placed on `pod_name` were it one of `pods` (a pod the operator
    has not seen yet: spread ranks it like any other, least-loaded fills it as the emptiest),
    hottest first (ties by name)."""
    adapters = list(adapters)
    where = place([a.want for a in adapters], set(pods) | {pod_name}, {a.want.name: a.where for a in adapters})
    mine = [a for a in adapters if pod_name in where.get(a.want.name, ())]
    return [a.want.name for a in sorted(mine, key=lambda a: (-a.rate, a.want.name))]


def candidates(adapters: Iterable[Mapping], base_spec: Mapping | None, rates: Mapping[str, float]) -> list[Candidate]:
    """`placed_on`'s input from the API's objects alone (where no pass ran, e.g. a standby):
    LoraAdapters as {name, spec, status} (a LoraAdapter's metadata.name also does), an auto one at
    the count it has now (its status.placement), hottest first by `rates`. Adapters whose
    placement cannot be used are left out, as the pass leaves them out."""
    default = render.with_defaults(dict(base_spec or {}))["placement"]
    out = []
    for a in adapters:
        name = a.get("name") or (a.get("metadata") or {}).get("name")
        spec, status = a.get("spec") or {}, a.get("status") or {}
        try:
            resolved = resolve(spec.get("placement"), default, bool(spec.get("preload")))
        except SpecProblem:
            continue
        where = tuple(status.get("placement") or ())
        want, _ = want_of(name, resolved, None, len(where))
        out.append(Candidate(want, float(rates.get(name, 0.0)), where))
    return out


@dataclass(frozen=True)
class BasePlacement:
    """What the last placement of one base was made of: its Wants and its pods."""

    wants: Mapping[str, Want]
    pods: tuple[str, ...]


@dataclass
class PlacementMemory:
    """The pods each adapter was last placed on, and per base the inputs of its last placement."""

    where: dict[Key, list[str]] = field(default_factory=dict)
    bases: dict[Key, BasePlacement] = field(default_factory=dict)

    def forget(self, key: Key) -> None:
        self.where.pop(key, None)

    def placed_on(self, namespace: str, base: str, pod_name: str, rates: Mapping[str, float]) -> list[str]:
        """`placed_on` over the base's last placement: the adapters a pod named `pod_name` would keep
        warm, hottest first by `rates` (adapter -> requests a second: AdapterRates.of_base)."""
        last = self.bases.get(Key(namespace, base))
        if last is None:
            return []
        return placed_on(pod_name, last.pods, [
            Candidate(w, rates.get(n, 0.0), tuple(self.where.get(Key(namespace, n), ()))) for n, w in last.wants.items()])


def place_adapters(memory: PlacementMemory, namespace: str, base: str, wants: Mapping[str, Want],
                   adapters: Mapping[str, dict], pods: Iterable[str]) -> dict[str, list[str]]:
    """Place the accepted adapters of one base (`wants`: name -> Want; `adapters`: name -> index
    entry) on its pods, starting from where they were, and remember the result."""
    pods = sorted(set(pods))
    previous = {name: memory.where.get(Key(namespace, name)) or (adapters[name].get("status") or {}).get("placement")
                or [] for name in wants}
    placed = place(wants.values(), pods, previous)
    for name, where in placed.items():
        memory.where[Key(namespace, name)] = where
    memory.bases[Key(namespace, base)] = BasePlacement(dict(wants), tuple(pods))
    return placed
