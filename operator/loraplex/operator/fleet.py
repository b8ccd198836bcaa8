"""One pass over one engine pod: read its adapter list once, diff it against the adapters placed
on it, push only the difference.

Per pass and pod the cost is one `GET /v1/adapters?view=compact` (plus `GET /info` only when the
pod object changed or an adapter we had pushed is missing, i.e. the engine may have restarted),
then one `POST /v1/adapters:batch` per up to `push_batch_size` adapters that differ (and a DELETE
per adapter retried or removed). A settled fleet of N adapters on R pods costs R requests per
pass, not N*R; a first push costs about R * N / push_batch_size.

Per (adapter, pod) a PodRecord remembers which engine process (boot id) got which manifest
(digest), the adapter's state there, its failure count and backoff. `plan_adapter` is the pure
decision; `sync_pod` does the HTTP and folds the answers back into the records.
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Iterable, Mapping

from loraplex.manifest import AdapterState

from . import constants as C
from .adapters import is_transient
from .backoff import exponential
from .config import OperatorConfig
from .engine_client import EngineClient, EngineError, EngineUnreachable, boot_id_of
from .revisions import listed_states
from .status import PodView

log = logging.getLogger("loraplex.operator.fleet")

# The states in which an adapter is registered in an engine and can serve.
SERVABLE_STATES = frozenset(s.value for s in (AdapterState.REGISTERED, AdapterState.HOST, AdapterState.DEVICE))


@dataclass(frozen=True)
class PodRecord:
    pod: str
    boot_id: str | None = None      # engine process the manifest went to
    digest: str | None = None       # manifest digest pushed to that process
    state: str | None = None        # registered/loading/host/device/failed, or `unreachable`
    message: str = ""
    failures: int = 0               # failed loads seen for this (boot id, digest)
    permanent: bool = False         # the last failure is the adapter's own fault (see is_transient)
    verified: bool = True           # False after a failure until a load succeeds again
    streak: int = 0                 # consecutive transport errors (unreachable engine)
    next_attempt: float = 0.0       # monotonic time before which the adapter is not retried here
    revisions: tuple[tuple[int, str, str], ...] = ()  # (number, state, message) per revision there

    def entry(self) -> dict:
        """The pod's entry in LoraAdapter status.pods."""
        out = {"name": self.pod, "state": self.state or "unknown", "message": self.message,
               "failures": self.failures}
        if self.boot_id:
            out["bootId"] = self.boot_id
        return out

    @property
    def servable(self) -> bool:
        if self.state in (AdapterState.HOST, AdapterState.DEVICE):
            return True
        return self.state == AdapterState.REGISTERED and self.verified

    @classmethod
    def from_entry(cls, entry: Mapping, digest: str | None) -> "PodRecord":
        """Seed memory from a status written before an operator restart."""
        state = entry.get("state")
        failures = int(entry.get("failures") or 0)
        return cls(pod=entry["name"], boot_id=entry.get("bootId"), digest=digest,
                   state=None if state in ("unknown", C.STATE_UNREACHABLE) else state,
                   message=entry.get("message") or "", failures=failures,
                   permanent=state == AdapterState.FAILED and not is_transient(entry.get("message") or ""),
                   verified=failures == 0)


def backoff(n: int, cfg: OperatorConfig) -> float:
    """The wait after the n-th failure in a row on a pod (backoff.exponential with the config's bounds)."""
    return exponential(n, cfg.backoff_base, cfg.backoff_max)


class Op(enum.Enum):
    NONE = "none"      # matches: only the record is refreshed from the listing
    PUSH = "push"      # PUT the manifest (missing there, or different: new, edited, changed behind our back)
    RETRY = "retry"    # failed there and its backoff is over: DELETE, then PUT again
    WAIT = "wait"      # failed, backing off (or given up)
    UNLOAD = "unload"  # a preload adapter given up on: DELETE so that the pod's /ready does not wait


def given_up(rec: PodRecord, cfg: OperatorConfig) -> bool:
    return rec.state == AdapterState.FAILED and rec.permanent and rec.failures >= cfg.max_failures


def fold_report(rec: PodRecord, state: str, message: str, now: float, cfg: OperatorConfig,
                new_attempt: bool) -> PodRecord:
    """Fold an adapter state the engine reported (listing or PUT answer) into the record. A
    `failed` counts once: when it ends an attempt, or when a servable adapter turned failed
    (a request's first use found the checkpoint bad)."""
    message = message or ""
    if state == AdapterState.FAILED:
        counts = new_attempt or rec.state != AdapterState.FAILED
        failures = rec.failures + 1 if counts else rec.failures
        return replace(rec, state=state, message=message or "load failed", failures=failures,
                       permanent=not is_transient(message), verified=False, streak=0,
                       next_attempt=now + backoff(failures, cfg) if counts else rec.next_attempt)
    verified = rec.verified or state in (AdapterState.HOST, AdapterState.DEVICE)
    if state in (AdapterState.HOST, AdapterState.DEVICE):
        return replace(rec, state=state, message=message, failures=0, permanent=False, verified=True,
                       streak=0, next_attempt=0.0)
    if state == AdapterState.REGISTERED and not verified:
        message = message or f"retrying after {rec.failures} failed load(s): {rec.message}"[:1000]
    return replace(rec, state=state, message=message, verified=verified, streak=0)


def fold_error(rec: PodRecord, err: Exception, now: float, cfg: OperatorConfig) -> PodRecord:
    """Fold an error answer: the engine refusing the manifest (a 4xx) is a failed attempt with
    the engine's message; a transport error or a 5xx marks the engine unreachable (retried
    with backoff, not counted against the adapter)."""
    if isinstance(err, EngineError) and not err.transient:
        failures = rec.failures + 1
        return replace(rec, state=AdapterState.FAILED.value, message=err.message, failures=failures,
                       permanent=True, verified=False, streak=0, next_attempt=now + backoff(failures, cfg))
    streak = rec.streak + 1
    msg = err.message if isinstance(err, EngineError) else str(err)
    return replace(rec, state=C.STATE_UNREACHABLE, message=msg, streak=streak,
                   next_attempt=now + backoff(streak, cfg))


def matches(listed: Mapping, manifest: dict, digest: str | None) -> bool:
    """The pod holds this manifest: by its digest (the compact listing), or by the manifest itself
    (the full rows of an engine without the compact view). An entry the engine loaded just in
    time (`dynamic`, from the operator's catalog) is not held: placed here, it must be registered,
    or the engine's LRU would forget it; the PUT keeps its weights."""
    if listed.get("dynamic"):
        return False
    if "manifest_digest" in listed and digest is not None:
        return listed["manifest_digest"] == digest
    return listed.get("manifest") == manifest


def plan_adapter(rec: PodRecord, listed: Mapping | None, manifest: dict, now: float,
                 cfg: OperatorConfig, digest: str | None = None) -> tuple[Op, PodRecord]:
    """What to do about one placed adapter on one pod, given what the pod's listing says."""
    if listed is None or not matches(listed, manifest, digest):
        if given_up(rec, cfg):
            return Op.WAIT, rec  # the same manifest failed for good on this engine: do not hammer it
        if rec.state == AdapterState.FAILED and now < rec.next_attempt:
            return Op.WAIT, rec
        return Op.PUSH, rec
    rec = fold_report(rec, str(listed.get("state")), str(listed.get("message") or ""), now, cfg, new_attempt=False)
    if rec.state != AdapterState.FAILED:
        return Op.NONE, rec
    if given_up(rec, cfg):
        return (Op.UNLOAD if manifest.get("preload") else Op.WAIT), rec
    if now < rec.next_attempt:
        return Op.WAIT, rec
    return Op.RETRY, rec


def next_wakeup(records: Iterable[PodRecord], cfg: OperatorConfig, now: float) -> float:
    """Seconds until the next pass should look at these records again."""
    delay = cfg.resync_interval
    for r in records:
        if r.state == AdapterState.LOADING or (r.state == AdapterState.REGISTERED and not r.verified):
            delay = min(delay, cfg.poll_interval)
        if r.next_attempt and r.state in (C.STATE_UNREACHABLE, AdapterState.FAILED):
            delay = min(delay, max(r.next_attempt - now, 0.05))
    return max(delay, 0.05)


@dataclass(frozen=True)
class Payload:
    """What should be on a pod for one placed adapter: its manifest (JSON) and that manifest's digest."""

    manifest: dict
    digest: str | None


@dataclass(frozen=True)
class Planned:
    """One request-worthy decision of a pass over a pod: an adapter, its Op and its record."""

    name: str
    op: Op
    rec: PodRecord


@dataclass
class PodPass:
    """What one pass over one pod did (for status, Events, metrics and tests)."""

    pod: str
    took_part: bool = True
    boot_id: str | None = None
    restarted: bool = False
    error: str | None = None
    records: dict[str, PodRecord] = field(default_factory=dict)
    pushed: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed_pushes: int = 0
    calls: int = 0


@dataclass
class PodMemory:
    """Per pod: the PodView the boot id was read for, and that boot id."""

    view: PodView | None = None
    boot_id: str | None = None
    next_attempt: float = 0.0
    streak: int = 0


async def sync_pod(engine: EngineClient, pod: PodView, mem: PodMemory, placed: Mapping[str, Payload],
                   records: Mapping[str, PodRecord], managed: set[str], cfg: OperatorConfig,
                   token: str | None, limit: asyncio.Semaphore, moving: Collection[str] = frozenset(),
                   now: Callable[[], float] = time.monotonic) -> PodPass:
    """One pass over one pod. `placed`: adapter -> Payload (manifest, digest) that should be on it;
    `records`: what we knew about them there; `managed`: every adapter name of the base (only
    those are ever removed from a pod: names others registered, or loaded just in time, stay);
    `moving`: adapters not yet servable on all their placed pods, kept here while servable
    (make-before-break, placement.settled). Never raises for engine trouble."""
    out = PodPass(pod=pod.name)
    if pod.ready and mem.streak and now() < mem.next_attempt:
        # Unreachable on the last pass and backing off: report what we had.
        out.error = "backing off"
        out.records = {n: records.get(n) or PodRecord(pod=pod.name, state=C.STATE_UNREACHABLE)
                       for n in placed}
        return out
    try:
        if mem.view != pod or mem.boot_id is None:
            log.debug("pod %s: reading its boot id (was %s)", pod, mem.view)
            out.calls += 1
            mem.boot_id = boot_id_of(await engine.info(pod.ip, pod.port, token))  # type: ignore[arg-type]
            mem.view = pod
        out.calls += 1
        listing = {a["name"]: a for a in await engine.list_adapters(pod.ip, pod.port, token)}  # type: ignore[arg-type]
        lost = [n for n, r in records.items() if n in placed and r.state in SERVABLE_STATES
                and r.boot_id == mem.boot_id and n not in listing]
        if lost:  # adapters we had pushed are gone: has the engine restarted under the same Pod?
            out.calls += 1
            mem.boot_id = boot_id_of(await engine.info(pod.ip, pod.port, token))  # type: ignore[arg-type]
    except (EngineError, EngineUnreachable) as e:
        mem.view, mem.boot_id = None, None
        if not pod.ready:
            out.took_part = False  # still starting (or dying): not a target yet
            return out
        mem.streak += 1
        mem.next_attempt = now() + backoff(mem.streak, cfg)
        out.error = e.message if isinstance(e, EngineError) else str(e)
        out.records = {n: fold_error(records.get(n) or PodRecord(pod=pod.name), e, now(), cfg) for n in placed}
        return out
    mem.streak, mem.next_attempt = 0, 0.0
    boot = out.boot_id = mem.boot_id

    ops: list[Planned] = []
    for name, payload in placed.items():
        manifest, digest = payload.manifest, payload.digest
        rec = records.get(name)
        if rec is not None and rec.boot_id and rec.boot_id != boot:
            out.restarted = True
        if rec is None or rec.boot_id != boot or rec.digest != digest:
            rec = PodRecord(pod=pod.name, boot_id=boot, digest=digest)  # counters start afresh
        elif rec.state == C.STATE_UNREACHABLE:
            rec = replace(rec, state=None, streak=0)
        op, rec = plan_adapter(rec, listing.get(name), manifest, now(), cfg, digest)
        # Each revision's state there, whatever manifest the pod holds (revision_pass's readiness).
        rec = replace(rec, revisions=listed_states(listing.get(name)))
        out.records[name] = rec
        if op is not Op.NONE and op is not Op.WAIT:
            ops.append(Planned(name, op, rec))
    # Registrations of ours that are not placed here any more. An entry the engine loaded just in
    # time (`dynamic`, from the catalog) is the engine's own, even under a managed name:
    # its LRU forgets it, and removing it would only make the next request load it again.
    # A `moving` adapter stays where it still serves until its new placement serves it.
    extra = [n for n, a in listing.items() if n in managed and n not in placed and not a.get("dynamic")
             and not (n in moving and a.get("state") in SERVABLE_STATES)]

    async def unload_first(planned: Planned) -> bool:
        """RETRY and UNLOAD start with a DELETE; False when nothing is to be pushed after it."""
        name, rec = planned.name, planned.rec
        async with limit:
            try:
                out.calls += 1
                await engine.delete_adapter(pod.ip, pod.port, name, token)  # type: ignore[arg-type]
            except (EngineError, EngineUnreachable) as e:
                out.failed_pushes += 1
                out.records[name] = fold_error(rec, e, now(), cfg)
                return False
        if planned.op is Op.UNLOAD:
            out.records[name] = replace(rec, message=f"{rec.message} (unloaded from this pod after "
                                                     f"{rec.failures} attempts so that its readiness "
                                                     "does not wait on it)")
            return False
        return True

    async def push(batch: list[Planned]) -> None:
        async with limit:
            try:
                result = await engine.put_adapters(pod.ip, pod.port, [placed[p.name].manifest for p in batch],
                                                   token)  # type: ignore[arg-type]
                out.calls += result.calls
                reports = result.reports
            except (EngineError, EngineUnreachable) as e:
                out.calls += 1
                reports = {p.name: e for p in batch}
        for p in batch:
            name, rec = p.name, p.rec
            report = reports.get(name) or EngineError(502, "no answer for this adapter in the batch")
            if isinstance(report, (EngineError, EngineUnreachable)):
                out.failed_pushes += 1
                out.records[name] = fold_error(rec, report, now(), cfg)
            else:
                (out.retried if p.op is Op.RETRY else out.pushed).append(name)
                rec = fold_report(rec, report.state, report.message, now(), cfg, new_attempt=True)
                if "revisions" in report.raw:
                    rec = replace(rec, revisions=listed_states(report.raw))
                out.records[name] = rec

    async def run_all() -> None:
        deleted_first = [p for p in ops if p.op in (Op.RETRY, Op.UNLOAD)]
        kept = await asyncio.gather(*(unload_first(p) for p in deleted_first))
        retry = {p.name for p, k in zip(deleted_first, kept) if k}
        to_push = [p for p in ops if p.op is Op.PUSH or p.name in retry]
        await asyncio.gather(*(push(b) for b in batches(to_push, lambda p: placed[p.name].manifest, cfg)))

    async def remove(name: str) -> None:
        async with limit:
            try:
                out.calls += 1
                await engine.delete_adapter(pod.ip, pod.port, name, token)  # type: ignore[arg-type]
                out.removed.append(name)
            except (EngineError, EngineUnreachable):
                out.failed_pushes += 1  # tried again next pass

    await asyncio.gather(run_all(), *(remove(n) for n in extra))
    return out


def batches(items: list, manifest_of: Callable, cfg: OperatorConfig) -> list[list]:
    """Split items into batches of at most cfg.push_batch_size manifests and about
    cfg.push_batch_bytes of JSON (the engine caps request bodies, 1 MiB by default). A manifest
    larger than that goes alone."""
    out: list[list] = []
    size = 0
    for item in items:
        n = len(json.dumps(manifest_of(item)))
        if not out or len(out[-1]) >= cfg.push_batch_size or size + n > cfg.push_batch_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out
