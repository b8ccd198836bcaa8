"""Pushing one adapter to the engine pods of its base and tracking each pod on its own.

Per pod, a PodRecord remembers which engine process (boot id) got which manifest (digest), the
adapter's state there, and the failure count and backoff. `decide` is the pure decision; the
`sync_pod` coroutine does the HTTP and `after_*` fold the answers back into the record. Every
pod runs concurrently with its own timeouts: a dead pod or a failing load never holds up the
other pods, and a bad adapter never holds up other adapters (each adapter has its own loop).
"""
from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field, replace

from . import constants as C
from .config import OperatorConfig
from .engine_client import EngineClient, EngineError, EngineUnreachable, boot_id_of
from .status import PodView


@dataclass(frozen=True)
class PodRecord:
    pod: str
    boot_id: str | None = None      # engine process the manifest went to
    digest: str | None = None       # manifest digest pushed to that process
    state: str | None = None        # registered/loading/host/device/failed, or `unreachable`
    message: str = ""
    failures: int = 0               # failed load attempts for this (boot id, digest)
    streak: int = 0                 # consecutive transport errors (unreachable engine)
    awaiting: bool = False          # a push is still loading on the engine
    next_attempt: float = 0.0       # monotonic time before which the pod is left alone

    def entry(self) -> dict:
        """The pod's entry in LoraAdapter status.pods."""
        out = {"name": self.pod, "state": self.state or "unknown", "message": self.message,
               "failures": self.failures}
        if self.boot_id:
            out["bootId"] = self.boot_id
        return out

    @classmethod
    def from_entry(cls, entry: dict, digest: str | None) -> "PodRecord":
        """Seed memory from a status written before an operator restart."""
        state = entry.get("state")
        return cls(pod=entry["name"], boot_id=entry.get("bootId"), digest=digest,
                   state=None if state == "unknown" else state, message=entry.get("message") or "",
                   failures=int(entry.get("failures") or 0), awaiting=state == C.STATE_LOADING)


class Action(enum.Enum):
    PUSH = "push"      # PUT the manifest (new engine process, new manifest, engine forgot it)
    RETRY = "retry"    # the last load failed and its backoff is over: DELETE, then PUT again
    POLL = "poll"      # pushed already: GET the adapter's state
    WAIT = "wait"      # backing off, or given up after max_failures


def backoff(n: int, cfg: OperatorConfig) -> float:
    return min(cfg.backoff_base * (2 ** max(n - 1, 0)), cfg.backoff_max)


def decide(rec: PodRecord | None, boot_id: str, digest: str, now: float, cfg: OperatorConfig) -> Action:
    if rec is None or rec.boot_id != boot_id or rec.digest != digest:
        return Action.PUSH
    if rec.state == C.STATE_FAILED:
        if rec.failures >= cfg.max_failures or now < rec.next_attempt:
            return Action.WAIT
        return Action.RETRY
    if rec.state in (None, C.STATE_UNREACHABLE):
        return Action.PUSH
    return Action.POLL


def fresh(rec: PodRecord | None, pod: str, boot_id: str, digest: str) -> PodRecord:
    """The record to fold a push into: counters survive only for the same process and manifest."""
    if rec is not None and rec.boot_id == boot_id and rec.digest == digest:
        return rec
    return PodRecord(pod=pod, boot_id=boot_id, digest=digest)


def after_report(rec: PodRecord, state: str, message: str, now: float, cfg: OperatorConfig,
                 attempted: bool) -> PodRecord:
    """Fold an adapter state reported by the engine (PUT or GET answer) into the record.
    A `failed` counts as one failure when it ends an attempt (a PUT, or the GET that sees an
    awaited load fail) or when a servable adapter turns failed."""
    if state == C.STATE_FAILED:
        counts = attempted or rec.awaiting or rec.state != C.STATE_FAILED
        failures = rec.failures + 1 if counts else rec.failures
        return replace(rec, state=state, message=message or "load failed", failures=failures, streak=0,
                       awaiting=False, next_attempt=now + backoff(failures, cfg) if counts else rec.next_attempt)
    if state == C.STATE_LOADING:
        return replace(rec, state=state, message=message, streak=0, awaiting=True)
    return replace(rec, state=state, message=message, failures=0, streak=0, awaiting=False, next_attempt=0.0)


def after_error(rec: PodRecord, err: Exception, now: float, cfg: OperatorConfig) -> PodRecord:
    """Fold an error answer: a refusal of the adapter (4xx) is a failed attempt with the
    engine's message; a transport error or a 5xx/503 marks the engine unreachable (retried
    with backoff, not counted against the adapter)."""
    if isinstance(err, EngineError) and not err.transient:
        failures = rec.failures + 1
        return replace(rec, state=C.STATE_FAILED, message=err.message, failures=failures, streak=0,
                       awaiting=False, next_attempt=now + backoff(failures, cfg))
    streak = rec.streak + 1
    msg = err.message if isinstance(err, EngineError) else str(err)
    return replace(rec, state=C.STATE_UNREACHABLE, message=msg, streak=streak, awaiting=False,
                   next_attempt=now + backoff(streak, cfg))


@dataclass
class SyncOutcome:
    record: PodRecord
    actions: list[str] = field(default_factory=list)  # what was done, for logs and tests


async def sync_pod(engine: EngineClient, pod: PodView, rec: PodRecord | None, manifest: dict, digest: str,
                   cfg: OperatorConfig, token: str | None = None, now=time.monotonic) -> SyncOutcome | None:
    """Bring one adapter on one pod one step closer to servable. Never raises for engine
    trouble: the answer is always folded into the returned record. A pod that is not Ready
    is left out (None) unless its engine answers: it may be waiting on a preload adapter."""
    name = manifest["name"]
    out = SyncOutcome(record=rec or PodRecord(pod=pod.name))
    if pod.ready and rec is not None and rec.state == C.STATE_UNREACHABLE and now() < rec.next_attempt:
        out.actions.append("wait")
        return out
    try:
        boot_id = boot_id_of(await engine.info(pod.ip, pod.port, token))  # type: ignore[arg-type]
    except (EngineError, EngineUnreachable) as e:
        if not pod.ready:
            return None  # still starting (or dying): not a target yet
        out.record = after_error(out.record, e, now(), cfg)
        out.actions.append("info-error")
        return out
    if rec is not None and rec.boot_id and rec.boot_id != boot_id:
        out.actions.append("restarted")  # a new engine process in the same pod
    action = decide(rec, boot_id, digest, now(), cfg)
    out.actions.append(action.value)
    if action is Action.WAIT:
        return out
    record = fresh(rec, pod.name, boot_id, digest)
    try:
        report = None
        if action is Action.POLL:
            report = await engine.get_adapter(pod.ip, pod.port, name, token)  # type: ignore[arg-type]
            if report is not None:
                out.record = after_report(record, report.state, report.message, now(), cfg, attempted=False)
            else:
                out.actions.append("push")  # the engine no longer knows it: push again
                action = Action.PUSH
        if action is Action.RETRY:
            await engine.delete_adapter(pod.ip, pod.port, name, token)  # type: ignore[arg-type]
        if action in (Action.PUSH, Action.RETRY):
            report = await engine.put_adapter(pod.ip, pod.port, manifest, token)  # type: ignore[arg-type]
            out.record = after_report(record, report.state, report.message, now(), cfg, attempted=True)
    except (EngineError, EngineUnreachable) as e:
        out.record = after_error(record, e, now(), cfg)
        out.actions.append("error")
    r = out.record
    if manifest.get("preload") and r.state == C.STATE_FAILED and r.failures >= cfg.max_failures \
            and (rec is None or rec.failures < cfg.max_failures or rec.boot_id != r.boot_id):
        # Given up. A failed preload adapter would hold the pod's /ready (and so every other
        # adapter on it) forever: unregister it there; the status keeps the engine's message.
        try:
            await engine.delete_adapter(pod.ip, pod.port, name, token)  # type: ignore[arg-type]
            out.record = replace(r, message=f"{r.message} (unloaded from this pod after {r.failures} "
                                            "attempts so that its readiness does not wait on it)")
            out.actions.append("unload")
        except (EngineError, EngineUnreachable):
            pass
    return out


async def sync_pods(engine: EngineClient, pods: list[PodView], records: dict[str, PodRecord], manifest: dict,
                    digest: str, cfg: OperatorConfig, token: str | None = None) -> dict[str, SyncOutcome]:
    """Every candidate pod concurrently, each bounded by its own deadline. The result holds
    the pods that took part (Ready ones always; others when their engine answered)."""
    limit = cfg.engine_timeout * 3 + cfg.engine_connect_timeout

    async def one(pod: PodView) -> SyncOutcome | None:
        try:
            return await asyncio.wait_for(
                sync_pod(engine, pod, records.get(pod.name), manifest, digest, cfg, token), limit)
        except asyncio.TimeoutError:
            if not pod.ready:
                return None
            rec = records.get(pod.name) or PodRecord(pod=pod.name)
            return SyncOutcome(after_error(rec, EngineUnreachable(f"pod {pod.name}: sync timed out"),
                                           time.monotonic(), cfg), ["timeout"])

    candidates = [p for p in pods if p.candidate]
    results = await asyncio.gather(*(one(p) for p in candidates))
    return {p.name: r for p, r in zip(candidates, results) if r is not None}


def next_wakeup(records: dict[str, PodRecord], cfg: OperatorConfig, now: float) -> float:
    """Seconds until this adapter's loop should look again."""
    delay = cfg.resync_interval
    for r in records.values():
        if r.awaiting or r.state == C.STATE_LOADING:
            delay = min(delay, cfg.poll_interval)
        if r.next_attempt and (r.state == C.STATE_UNREACHABLE or
                               (r.state == C.STATE_FAILED and r.failures < cfg.max_failures)):
            delay = min(delay, max(r.next_attempt - now, 0.05))
    return max(delay, 0.05)
