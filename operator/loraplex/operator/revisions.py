"""A LoraAdapter's revisions: pure bookkeeping and rendering (issue 23).

Bookkeeping. Every change of the weights the adapter serves (spec.source: type, uri, Hub revision,
sha256, configSha256) makes a new immutable revision, numbered from 1 (status.latestRevision). An
adapter whose status has no revisions yet (made before revisions existed) gets revision 1 from its
source at the first pass. status.revisions keeps the newest `revisionHistoryLimit` revisions plus
any that traffic or a rollout names (`collect_garbage`); a revision dropped there is dropped from
the manifest, so the engines unload it too.

Readiness. The engines' listing rows carry per revision its state on that pod (fleet.PodRecord
keeps them, `revisions`). A revision is ready when it is in host or device memory on every Ready
pod the adapter is placed on, and there is at least one (`readiness`): only then does traffic.py
move requests to it, so its first request there is warm.

Rendering. The manifest the operator sends always carries `revisions`: those the engines must have
(TrafficPlan.serve), each with its percent of the name's requests (0 for a warming or pinnable
one), weights from status.revisions. The top-level weight fields stay spec.source.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Mapping

from loraplex.manifest import MAX_SERVED_REVISIONS, AdapterManifest, AdapterRevision, AdapterState

DEFAULT_HISTORY_LIMIT = 5
NOT_READY_SHOWN = 10  # pod names in status.revisions[].notReady
READY_STATES = frozenset({AdapterState.HOST.value, AdapterState.DEVICE.value})
# CRD source field -> manifest weight field.
SOURCE_FIELDS = {"type": "source", "uri": "uri", "revision": "revision", "sha256": "sha256",
                 "configSha256": "config_sha256"}


def source_of(spec: Mapping) -> dict:
    """The weight fields of spec.source, as status.revisions[].source holds them (type defaulted
    as adapters.build_manifest defaults it; credentials and other fields left out)."""
    src = spec.get("source") or {}
    out = {"type": src.get("type") or "hub", "uri": src.get("uri") or ""}
    for k in ("revision", "sha256", "configSha256"):
        if src.get(k):
            out[k] = src[k].lower() if k != "revision" else src[k]
    return out


def weights_digest(source: Mapping) -> str:
    """16 hex of the sha256 of the source's canonical JSON: two sources serve the same weights
    exactly when their digests are equal."""
    blob = json.dumps({k: source[k] for k in SOURCE_FIELDS if source.get(k)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_of(source: Mapping) -> dict:
    """A revision's source as manifest weight fields (source, uri, revision, sha256, config_sha256)."""
    return {field: source[k] for k, field in SOURCE_FIELDS.items() if source.get(k)}


@dataclass(frozen=True)
class Book:
    """The revisions after this pass's bookkeeping: the latest number, status.revisions (newest
    first, without readiness) and the number made by this pass, if any."""

    latest: int
    revisions: list[dict]
    created: int | None = None

    @property
    def known(self) -> set[int]:
        return {int(r["revision"]) for r in self.revisions}

    def entry(self, number: int) -> dict | None:
        return next((r for r in self.revisions if r["revision"] == number), None)


_KEPT = ("revision", "manifestDigest", "source", "createdAt")  # what identifies a revision; readiness is recomputed


def next_revisions(spec: Mapping, status: Mapping, now: str) -> Book:
    """status.latestRevision and status.revisions after the spec's source is seen: a new revision
    when its weights differ from the latest revision's (or when there is none)."""
    old = [{k: r[k] for k in _KEPT if k in r} for r in status.get("revisions") or [] if r.get("revision")]
    latest = int(status.get("latestRevision") or 0)
    latest = max([latest] + [int(r["revision"]) for r in old])
    source = source_of(spec)
    digest = weights_digest(source)
    current = next((r for r in old if r["revision"] == latest), None)
    if current is not None and current.get("manifestDigest") == digest:
        return Book(latest, sorted(old, key=lambda r: -r["revision"]))
    new = {"revision": latest + 1, "manifestDigest": digest, "source": source, "createdAt": now}
    return Book(latest + 1, sorted([new] + old, key=lambda r: -r["revision"]), created=latest + 1)


def named(spec: Mapping, status: Mapping, latest: int) -> set[int]:
    """Revisions that spec.traffic, status.traffic or status.rollout name (never collected)."""
    out = {latest}
    for t in spec.get("traffic") or []:
        out.add(latest if t.get("latestRevision") else int(t.get("revision") or latest))
    for t in status.get("traffic") or []:
        out.add(int(t["revision"]))
    rollout = status.get("rollout") or {}
    out |= {int(rollout[k]) for k in ("revision", "stableRevision") if rollout.get(k)}
    return out


def collect_garbage(book: Book, limit: int, keep: Iterable[int]) -> Book:
    """The newest `limit` revisions and those in `keep`, newest first."""
    keep = set(keep)
    kept = [r for i, r in enumerate(book.revisions) if i < limit or r["revision"] in keep]
    return Book(book.latest, kept, book.created)


def history_limit(spec: Mapping) -> int:
    try:
        return max(1, int(spec.get("revisionHistoryLimit") or DEFAULT_HISTORY_LIMIT))
    except (TypeError, ValueError):
        return DEFAULT_HISTORY_LIMIT


# --- readiness ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RevisionReadiness:
    """One revision on the Ready pods the adapter is placed on."""

    ready_replicas: int
    total_replicas: int
    not_ready: tuple[str, ...]
    failed: str | None = None  # "<pod>: <engine message>" of the first pod where it failed

    @property
    def ready(self) -> bool:
        return self.total_replicas > 0 and self.ready_replicas == self.total_replicas


def readiness(numbers: Iterable[int], pods: Iterable[str],
              states: Mapping[str, Mapping[int, tuple[str, str]]]) -> dict[int, RevisionReadiness]:
    """Per revision, its readiness over `pods` (the placed Ready pods), from `states`: pod ->
    revision -> (state, message) as the pod's listing reported them (absent: not there yet)."""
    pods = sorted(pods)
    out = {}
    for n in numbers:
        ready, not_ready, failed = 0, [], None
        for pod in pods:
            state, message = (states.get(pod) or {}).get(n, ("", ""))
            if state in READY_STATES:
                ready += 1
                continue
            not_ready.append(pod)
            if state == AdapterState.FAILED.value and failed is None:
                failed = f"{pod}: {message or 'load failed'}"
        out[n] = RevisionReadiness(ready, len(pods), tuple(not_ready), failed)
    return out


def with_readiness(revisions: list[dict], ready: Mapping[int, RevisionReadiness]) -> list[dict]:
    """status.revisions entries with readyReplicas, totalReplicas and notReady (at most 10 named)."""
    out = []
    for r in revisions:
        v = ready.get(r["revision"]) or RevisionReadiness(0, 0, ())
        out.append({**r, "readyReplicas": v.ready_replicas, "totalReplicas": v.total_replicas,
                    "notReady": list(v.not_ready[:NOT_READY_SHOWN])})
    return out


def listed_states(row: Mapping | None) -> tuple[tuple[int, str, str], ...]:
    """(number, state, message) of each revision in an engine listing row (or PUT answer)."""
    out = []
    for r in (row or {}).get("revisions") or []:
        try:
            out.append((int(r["number"]), str(r.get("state") or ""), str(r.get("message") or "")))
        except (KeyError, TypeError, ValueError):
            continue
    return tuple(sorted(out))


# --- rendering ---------------------------------------------------------------------------------

def served(manifest: AdapterManifest, book: Book, traffic: list[dict], serve: Iterable[int]) -> AdapterManifest:
    """The manifest the engines get: `manifest` (built from spec.source) with `revisions` = the
    served revisions, each with its percent of `traffic` (0 when it has none). Revisions unknown
    to the book are left out; at most MAX_SERVED_REVISIONS, the 0 % ones dropped first (oldest
    first). A traffic that does not sum to 100 over the known revisions puts 100 on the latest."""
    percents = {int(t["revision"]): int(t["percent"]) for t in traffic if book.entry(int(t["revision"]))}
    if sum(percents.values()) != 100:
        percents = {book.latest: 100}
    numbers = sorted(({int(n) for n in serve} | set(percents)) & book.known, reverse=True)
    zero = [n for n in numbers if not percents.get(n)]
    while len(numbers) > MAX_SERVED_REVISIONS and zero:
        numbers.remove(zero.pop())  # the oldest 0 % one
    revisions = [AdapterRevision(number=n, percent=percents.get(n, 0), **weights_of(book.entry(n)["source"]))
                 for n in numbers]
    return manifest.model_copy(update={"revisions": sorted(revisions, key=lambda r: r.number)})


def served_from_status(manifest: AdapterManifest, spec: Mapping, status: Mapping) -> AdapterManifest:
    """What the pass serves, rebuilt from a LoraAdapter's status alone (the adapter catalog's
    just-in-time manifest, on any operator replica): status.traffic with its percents, the
    running rollout's canary at 0 %. Before the first pass wrote revisions: revision 1, 100 %."""
    book = next_revisions(spec, status, status.get("createdAt") or "")
    if not status.get("revisions"):
        return served(manifest, book, [{"revision": book.latest, "percent": 100}], [book.latest])
    traffic = list(status.get("traffic") or [])
    rollout = status.get("rollout") or {}
    serve = {int(t["revision"]) for t in traffic}
    if rollout.get("phase") == "Progressing" and rollout.get("revision"):
        serve.add(int(rollout["revision"]))
    return served(manifest, Book(book.latest, book.revisions), traffic, serve)
