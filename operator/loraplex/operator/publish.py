"""What the operator tells the cluster: statuses and Events. Its own state is the memory of its
last status writes (StatusMemory), so that a pass right after a write does not write (and
announce) the same again before the watch delivers it. The statuses themselves are computed by
status.py (pure); here they are compared, written and announced.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from . import adapters as A
from . import constants as C
from . import metrics
from . import status as S
from .config import OperatorConfig
from .constants import Key
from .fleet import PodRecord, next_wakeup
from .kube import ApiError, KubeClient, Ref

if TYPE_CHECKING:
    from .revision_pass import RevisionStatus

log = logging.getLogger("loraplex.operator")

# Spec problems that wait for something to appear (GitOps applies in any order): Pending, not Failed.
PENDING_REASONS = frozenset({"BaseNotFound", "SecretNotFound", "SecretKeyNotFound"})

# How long the operator trusts its own last status write over the body it was handed (which
# lags behind until the watch delivers that write). Past it, the live object is the truth again.
STATUS_MEMORY_SECONDS = 10.0

Event = tuple[str, str, str]  # (type, reason, message), as kube.post_event takes them


def bmd_ref(namespace: str, name: str) -> Ref:
    return Ref(C.API_VERSION, C.BMD_PLURAL, namespace, name)


def lora_ref(namespace: str, name: str) -> Ref:
    return Ref(C.API_VERSION, C.LORA_PLURAL, namespace, name)


def adapter_body(ns: str, a: dict) -> dict:
    """What an Event about a LoraAdapter (an index entry) needs to name it."""
    return {"apiVersion": C.API_VERSION, "kind": C.LORA_KIND,
            "metadata": {"name": a["name"], "namespace": ns, "uid": a.get("uid")}, "status": a.get("status") or {}}


@dataclass(frozen=True)
class Written:
    """A status this operator wrote, and when."""

    at: float
    status: dict


@dataclass
class StatusMemory:
    """The operator's last status writes, and the adapters of each base by phase (a metric)."""

    written: dict[Ref, Written] = field(default_factory=dict)
    phase_counts: dict[Key, dict[str, int]] = field(default_factory=dict)


async def post_events(kube: KubeClient, body: dict, events: Iterable[Event]) -> None:
    for type_, reason, message in events:
        try:
            await kube.post_event(body, type=type_, reason=reason, message=message)
        except (ApiError, OSError) as e:  # Events are auxiliary: never fail a reconcile for one
            log.warning("could not post Event %s/%s: %s", reason, message, e)


def current_status(memory: StatusMemory, ref: Ref, body: dict) -> dict:
    """The status as it is now: the body's, or this operator's own write that the body does not
    show yet. Without it a pass right after a write would write (and announce) the same twice."""
    live = body.get("status") or {}
    mem = memory.written.get(ref)
    if mem and time.monotonic() - mem.at < STATUS_MEMORY_SECONDS and S.differs(live, mem.status):
        return {**live, **{k: v for k, v in mem.status.items() if v is not None}}
    return live


async def write_status(kube: KubeClient, memory: StatusMemory, ref: Ref, body: dict, new: dict,
                       events: Callable[[dict, dict], Iterable[Event]], old: dict | None = None) -> bool:
    """Patch the status when it differs; post the Events of the transition. True if written."""
    old = current_status(memory, ref, body) if old is None else old
    if not S.differs(old, new):
        return False
    await kube.patch_status(ref, new)
    memory.written[ref] = Written(time.monotonic(), new)
    log.info("status of %s %s/%s: %s -> %s", ref.plural, ref.namespace, ref.name, old.get("phase"), new.get("phase"))
    await post_events(kube, body, events(old, new))
    return True


def problem_status(problem: A.SpecProblem, generation, old: dict, cfg: OperatorConfig) -> dict:
    """The status of an adapter that was not accepted: Pending or Failed, placed nowhere."""
    phase = "Pending" if problem.reason in PENDING_REASONS else "Failed"
    new = S.adapter_status(generation=generation, accepted=(False, problem.reason, problem.message),
                           pods=[], digest=None, max_failures=cfg.max_failures, old=old, problem_phase=phase)
    new["manifestDigest"] = None
    new["placement"] = []
    new["placementReason"] = None
    return new


@dataclass(frozen=True)
class StatusWrite:
    """An adapter's status as it is and as it should be."""

    adapter: dict
    old: dict
    new: dict
    events: tuple[Event, ...] = ()  # the revisions' own (traffic shifts, rollout steps), posted with the write


@dataclass
class AdapterStatuses:
    """The adapters' statuses of one pass: the Events on the base and the next wake-up."""

    events: list[Event] = field(default_factory=list)
    delay: float = 0.0


async def adapter_statuses(kube: KubeClient, memory: StatusMemory, cfg: OperatorConfig, base: dict,
                           adapters: list[dict], problems: dict[str, A.SpecProblem], placed: dict[str, list[str]],
                           records: dict[str, dict[str, PodRecord]], took_part: set[str],
                           digests: dict[str, str], reasons: dict[str, str] | None = None,
                           revisions: Mapping[str, RevisionStatus] | None = None) -> AdapterStatuses:
    """Compute every adapter's status, write those that differ (cfg.status_concurrency at once);
    aggregate the phase transitions into Events on the base. `reasons`: why an auto adapter has
    the warm pods it has (status.placementReason); `revisions`: each adapter's revision status
    (revision_pass.status_of), its Events posted on the adapter with the write."""
    reasons = reasons or {}
    revisions = revisions or {}
    ns, bname = base["metadata"]["namespace"], base["metadata"]["name"]
    now_mono = time.monotonic()
    out = AdapterStatuses(delay=cfg.resync_interval)
    transitions: dict[str, list[str]] = {}
    writes: list[StatusWrite] = []
    for a in adapters:
        name = a["name"]
        if a.get("deleting"):
            continue
        old = current_status(memory, lora_ref(ns, name), adapter_body(ns, a))
        rev = revisions.get(name)
        if name in problems:
            new = problem_status(problems[name], a.get("generation"), old, cfg)
            rev = None
        else:
            where = placed.get(name, [])
            recs = [records[name][pod] for pod in where if pod in took_part and pod in records[name]]
            # A placed pod that is not Ready and does not answer yet (starting, restarting) is
            # listed as such: the adapter is not warm there.
            waiting = [{"name": pod, "state": "unknown", "message": "engine pod not ready", "failures": 0}
                       for pod in where if pod not in took_part]
            new = S.adapter_status(generation=a.get("generation"), accepted=(True, "Accepted", ""),
                                   pods=[r.entry() for r in recs] + waiting, digest=digests[name],
                                   max_failures=cfg.max_failures, old=old,
                                   extra_conditions=rev.conditions if rev else ())
            new["placement"] = list(where)
            new["placementReason"] = reasons.get(name)  # None (removed) unless placement.replicas is auto
            out.delay = min(out.delay, next_wakeup(recs, cfg, now_mono))
            if rev is not None:
                new.update(rev.fields)
                if rev.requeue_after is not None:  # a rollout step's end, a warming revision
                    out.delay = min(out.delay, max(rev.requeue_after, 0.05))
        if old.get("phase") != new["phase"]:
            transitions.setdefault(new["phase"], []).append(name)
        writes.append(StatusWrite(a, old, new, tuple(rev.events) if rev else ()))

    limit = asyncio.Semaphore(cfg.status_concurrency)

    async def write(w: StatusWrite) -> None:
        a = w.adapter
        async with limit:
            try:
                await write_status(kube, memory, lora_ref(ns, a["name"]), adapter_body(ns, a), w.new,
                                   lambda o, n: S.adapter_warnings(o, n) + list(w.events), old=w.old)
            except ApiError as e:
                if e.status != 404:  # deleted meanwhile: nothing to report on
                    log.warning("status of adapter %s/%s not written: %s", ns, a["name"], e)

    await asyncio.gather(*(write(w) for w in writes if S.differs(w.old, w.new)))
    for phase, names in sorted(transitions.items()):
        names.sort()
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        kind = "Warning" if phase in ("Failed", "Degraded") else "Normal"
        out.events.append((kind, f"Adapters{phase}", f"{len(names)} adapter(s) now {phase}: {shown}"))
    counts: dict[str, int] = {}
    for w in writes:
        counts[w.new["phase"]] = counts.get(w.new["phase"], 0) + 1
    memory.phase_counts[Key(ns, bname)] = counts
    metrics.set_adapter_phases(memory.phase_counts)
    return out


async def orphan_status(kube: KubeClient, memory: StatusMemory, cfg: OperatorConfig, body: dict) -> None:
    """A LoraAdapter whose base does not exist (yet: GitOps applies in any order): Pending."""
    meta, spec = body["metadata"], body.get("spec") or {}
    ref = lora_ref(meta["namespace"], meta["name"])
    old = current_status(memory, ref, body)
    try:
        A.validate(meta["name"], spec, None)
        raise AssertionError("unreachable: a missing base is a SpecProblem")
    except A.SpecProblem as problem:
        new = problem_status(problem, meta.get("generation"), old, cfg)
    await write_status(kube, memory, ref, body, new, S.adapter_warnings)
