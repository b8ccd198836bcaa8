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
them resident before it is Ready).

The decisions (`resolve`, `place`, `by_pod`) are pure; PlacementMemory keeps the last placement
of each adapter between passes (seeded from status.placement after a restart), and
`place_adapters` is the base pass's placement step over it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .constants import Key

ALL = "all"
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


def resolve(spec_placement: Mapping | None, base_default: Mapping | None, preload: bool) -> tuple[int | str, str]:
    """(replicas, policy) of an adapter: its own placement, else its base's default, else 2/spread."""
    own, dflt = dict(spec_placement or {}), dict(base_default or {})
    replicas = own.get("replicas", dflt.get("replicas", DEFAULT_REPLICAS))
    policy = own.get("policy", dflt.get("policy", DEFAULT_POLICY))
    if preload:
        replicas = ALL
    if isinstance(replicas, str) and replicas != ALL:
        replicas = int(replicas)
    return replicas, policy


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


@dataclass
class PlacementMemory:
    """The pods each adapter was last placed on."""

    where: dict[Key, list[str]] = field(default_factory=dict)

    def forget(self, key: Key) -> None:
        self.where.pop(key, None)


def place_adapters(memory: PlacementMemory, namespace: str, base_spec: Mapping, adapters: Mapping[str, dict],
                   manifests: Mapping[str, Any], pods: Iterable[str]) -> dict[str, list[str]]:
    """Place the accepted adapters (`manifests`: name -> manifest; `adapters`: name -> index
    entry) of one base on its pods, starting from where they were, and remember the result."""
    wants, previous = [], {}
    for name, m in manifests.items():
        a = adapters[name]
        replicas, policy = resolve(a["spec"].get("placement"), base_spec.get("placement"), m.preload)
        wants.append(Want(name, replicas, policy))
        previous[name] = memory.where.get(Key(namespace, name)) or (a.get("status") or {}).get("placement") or []
    placed = place(wants, pods, previous)
    for name, where in placed.items():
        memory.where[Key(namespace, name)] = where
    return placed
