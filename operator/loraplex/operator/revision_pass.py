"""The revisions step of the base pass (issue 23), between placement and the push:

  plan_revisions   per accepted LoraAdapter: its revisions (revisions.py) from spec.source and
                   the last status, their readiness on its placed Ready pods (from the pods'
                   listings of the last pass), traffic.plan_traffic's decision, and the manifest
                   the engines get (carrying the served revisions) in place of the plain one;
  status_of        after the push: the status fragment (latestRevision, revisions with their
                   readiness now, traffic, rollout), the plan's conditions, Events and requeue.

Level-triggered: everything is recomputed from the spec, the status and the listings at each
pass, and publish.py writes the status only when it differs. The served manifest is cached per
adapter on what it is built from, so that a settled base costs no rendering.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from loraplex.manifest import AdapterManifest

from . import apply, publish
from . import revisions as V
from .constants import Key
from .fleet import PodRecord
from .status import get_condition
from .traffic import Readiness, RevisionHealth, TrafficPlan, format_time, plan_traffic

if TYPE_CHECKING:
    from .runtime import Runtime
    from .sync import Accepted

log = logging.getLogger("loraplex.operator")


@dataclass(frozen=True)
class ServedManifest:
    """An adapter's served manifest and what it was built from."""

    base: AdapterManifest  # the plain manifest (held, so that its identity is a valid part of the stamp)
    stamp: tuple
    manifest: AdapterManifest


@dataclass
class RevisionPass:
    """One adapter's revisions through one pass."""

    book: V.Book
    plan: TrafficPlan


@dataclass
class RevisionStatus:
    """What the pass adds to an adapter's status."""

    fields: dict
    conditions: list[dict] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None


def states_of(records: Mapping[str, PodRecord]) -> dict[str, dict[int, tuple[str, str]]]:
    """pod -> revision -> (state, message), as the pods' listings last reported them."""
    return {pod: {n: (s, m) for n, s, m in rec.revisions} for pod, rec in records.items()}


def health_of(rt: Runtime, namespace: str, base: str, name: str) -> Mapping[int, RevisionHealth]:
    return rt.revision_counters.revision_health(namespace, base, name)


@dataclass(frozen=True)
class Planned:
    """An adapter's plan and served manifest, and what they were computed from."""

    stamp: tuple
    manifest: AdapterManifest  # the plain manifest
    served: AdapterManifest
    rp: RevisionPass


def plan_stamp(spec: Mapping, status: Mapping, where: list[str], records: Mapping[str, PodRecord]) -> tuple | None:
    """Everything a plan without a rollout depends on: the spec, the status fields it reads, and
    the revisions' states on the pods it is placed on. None under spec.rollout, whose plan also
    depends on the clock and the health counters (it is computed at every pass)."""
    if spec.get("rollout") is not None:
        return None
    conditions = tuple(repr(get_condition(dict(status), t)) for t in ("TrafficReady", "Rollout"))
    return (apply.canonical(spec), status.get("latestRevision"), repr(status.get("revisions")),
            repr(status.get("traffic")), repr(status.get("rollout")), conditions,
            tuple((p, records[p].revisions if p in records else None) for p in where))


def plan_revisions(rt: Runtime, base: dict, adapters: list[dict], accepted: Accepted,
                   placed: Mapping[str, list[str]], ready_pods: set[str]) -> dict[str, RevisionPass]:
    """Each accepted adapter's revisions and traffic; `accepted.manifests` become the served
    manifests (what the ConfigMap and the pushes carry)."""
    ns, bname = base["metadata"]["namespace"], base["metadata"]["name"]
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    by_name = {a["name"]: a for a in adapters}
    out: dict[str, RevisionPass] = {}
    for name, manifest in list(accepted.manifests.items()):
        a = by_name[name]
        key = Key(ns, name)
        # The status as this operator last wrote it (the body may lag): a rollout's step, a new
        # revision's number and createdAt are decided once, not again by the next pass.
        status = publish.current_status(rt.status, publish.lora_ref(ns, name), publish.adapter_body(ns, a))
        spec = a["spec"]
        where = [p for p in placed.get(name, []) if p in ready_pods]
        records = rt.sync.records.get(key) or {}
        # A settled adapter (nothing it depends on changed) is not planned again: at 10,000
        # adapters that is most of a settled pass's time (tests/operator/test_fleet_scale.py).
        stamp = plan_stamp(spec, status, where, records)
        hit = rt.sync.planned.get(key)
        if stamp is not None and hit is not None and hit.stamp == stamp and hit.manifest == manifest:
            accepted.manifests[name], out[name] = hit.served, hit.rp
            continue
        try:
            book = V.next_revisions(spec, status, format_time(now))
            ready = V.readiness(book.known, where, states_of(records))
            plan = plan_traffic(spec, status, book.latest, book.known,
                                {n: Readiness(v.ready, v.failed) for n, v in ready.items()},
                                health_of(rt, ns, bname, name), now)
        except (ValueError, TypeError, KeyError) as e:  # a status no schema check caught: serve what it says
            log.warning("adapter %s/%s: revisions not planned (%s); serving its status as it is", ns, name, e)
            accepted.manifests[name] = V.served_from_status(manifest, spec, status)
            continue
        keep = V.named(spec, status, book.latest) | set(plan.serve) | {int(t["revision"]) for t in plan.traffic}
        keep |= {int(plan.rollout[k]) for k in ("revision", "stableRevision") if (plan.rollout or {}).get(k)}
        book = V.collect_garbage(book, V.history_limit(spec), keep)
        accepted.manifests[name] = served(rt, key, manifest, book, plan)
        out[name] = RevisionPass(book, plan)
        if stamp is not None:
            rt.sync.planned[key] = Planned(stamp, manifest, accepted.manifests[name], out[name])
        else:
            rt.sync.planned.pop(key, None)
    return out


def served(rt: Runtime, key: Key, manifest: AdapterManifest, book: V.Book, plan: TrafficPlan) -> AdapterManifest:
    """revisions.served, cached on its inputs (the plain manifest, the served revisions' weights
    and the split)."""
    traffic = tuple((int(t["revision"]), int(t["percent"])) for t in plan.traffic)
    numbers = sorted(set(plan.serve) | {n for n, _ in traffic})
    weights = tuple((n, (book.entry(n) or {}).get("manifestDigest")) for n in numbers)
    stamp = (traffic, weights)
    hit = rt.sync.served.get(key)
    if hit is None or hit.base is not manifest or hit.stamp != stamp:
        hit = ServedManifest(manifest, stamp, V.served(manifest, book, plan.traffic, plan.serve))
        rt.sync.served[key] = hit
    return hit.manifest


def status_of(rp: RevisionPass, placed: list[str], ready_pods: set[str],
              records: Mapping[str, PodRecord]) -> RevisionStatus:
    """The adapter's revision status after the push (readiness from the pods' answers of this pass)."""
    where = [p for p in placed if p in ready_pods]
    ready = V.readiness(rp.book.known, where, states_of(records))
    fields = {"latestRevision": rp.book.latest, "revisions": V.with_readiness(rp.book.revisions, ready),
              "traffic": list(rp.plan.traffic), "rollout": rp.plan.rollout}
    return RevisionStatus(fields, list(rp.plan.conditions), list(rp.plan.events), rp.plan.requeue_after)
