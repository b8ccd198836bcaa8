"""Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

Exactly one operator acts: every replica blocks in kopf's startup until it holds the Lease
`loraplex-operator` in its own namespace (POD_NAMESPACE), with its pod name (POD_NAME) as the
holder identity. The leader renews it every `retry_period`; a candidate takes it over only when
its record has not changed for `lease_duration` as measured on the candidate's own clock (no
clock skew between nodes matters). Every write is a JSON patch whose `test` operations make it a
compare-and-swap on the record the writer saw, so two candidates can never both win.
A leader that cannot renew within `renew_deadline` stops acting at once: the process exits and
its Deployment restarts it as a candidate. A leader that stops cleanly releases the Lease.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from .kube import JSON_PATCH, ApiError, KubeClient, Ref

log = logging.getLogger("loraplex.operator.lease")

LEASE_NAME = "loraplex-operator"


def micro_time(t: float | None = None) -> str:
    d = dt.datetime.fromtimestamp(time.time() if t is None else t, dt.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Election:
    kube: KubeClient
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.ref = Ref("coordination.k8s.io/v1", "leases", self.namespace, LEASE_NAME)
        self._observed: dict | None = None   # the Lease spec as last seen
        self._observed_at = 0.0              # when it last changed, on our clock
        self.is_leader = False
        self.last_renew = 0.0

    # --- one attempt ----------------------------------------------------------------------------
    def _spec(self, old: dict | None) -> dict:
        now = micro_time()
        mine = bool(old) and old.get("holderIdentity") == self.identity
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(int(round(self.lease_duration)), 1),
            "acquireTime": (old or {}).get("acquireTime") if mine else now,
            "renewTime": now,
            "leaseTransitions": int((old or {}).get("leaseTransitions") or 0) + (0 if mine or not old else 1),
        }

    def _observe(self, spec: dict | None) -> None:
        if spec != self._observed:
            self._observed, self._observed_at = spec, self.clock()

    async def try_acquire_or_renew(self) -> bool:
        """One round: True when this process holds the Lease afterwards."""
        live = await self.kube.get(self.ref)
        if live is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": LEASE_NAME, "namespace": self.namespace},
                    "spec": self._spec(None)}
            try:
                await self.kube.create(self.ref, body)
            except ApiError as e:
                if e.status == 409:
                    return False  # another candidate created it first
                raise
            self._observe(body["spec"])
            return True
        spec = dict(live.get("spec") or {})
        self._observe(spec)
        holder = spec.get("holderIdentity") or ""
        expired = self.clock() - self._observed_at >= float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and not expired:
            return False
        new = self._spec(spec)
        # Compare-and-swap: apply only if the record is still the one we judged.
        patch: list[dict[str, Any]] = [
            {"op": "test", "path": "/spec/holderIdentity", "value": spec.get("holderIdentity")},
            {"op": "test", "path": "/spec/renewTime", "value": spec.get("renewTime")},
        ] if "holderIdentity" in spec and "renewTime" in spec else []
        rv = (live.get("metadata") or {}).get("resourceVersion")
        if rv:
            patch.append({"op": "test", "path": "/metadata/resourceVersion", "value": rv})
        patch.append({"op": "replace" if "holderIdentity" in spec else "add", "path": "/spec", "value": new})
        try:
            await self.kube.patch(self.ref, patch, content_type=JSON_PATCH)
        except ApiError as e:
            if e.status in (409, 422, 400):
                return False  # someone else wrote it between our read and our write
            raise
        self._observe(new)
        return True

    # --- the loops ------------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Block until this process is the leader."""
        announced = False
        while True:
            try:
                if await self.try_acquire_or_renew():
                    self.is_leader, self.last_renew = True, self.clock()
                    log.info("leader election: %s now holds Lease %s/%s", self.identity, self.namespace, LEASE_NAME)
                    return
            except (ApiError, OSError) as e:
                log.warning("leader election: %s", e)
            if not announced:
                log.info("leader election: waiting for Lease %s/%s (held by %s)", self.namespace, LEASE_NAME,
                         (self._observed or {}).get("holderIdentity"))
                announced = True
            await asyncio.sleep(self.retry_period)

    async def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew every retry period; call `on_lost` when renewal failed for renew_deadline."""
        while True:
            await asyncio.sleep(self.retry_period)
            try:
                if await self.try_acquire_or_renew():
                    self.last_renew = self.clock()
                    continue
                log.error("leader election: Lease %s/%s was taken by %s", self.namespace, LEASE_NAME,
                          (self._observed or {}).get("holderIdentity"))
                self.is_leader = False
                on_lost()
                return
            except (ApiError, OSError) as e:
                log.warning("leader election: renewal failed: %s", e)
            if self.clock() - self.last_renew > self.renew_deadline:
                log.error("leader election: could not renew for %.0fs; stepping down", self.renew_deadline)
                self.is_leader = False
                on_lost()
                return

    async def release(self) -> None:
        """Give the Lease up at a clean stop, so that a candidate takes over at once."""
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            live = await self.kube.get(self.ref)
            spec = (live or {}).get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            await self.kube.patch(self.ref, [
                {"op": "test", "path": "/spec/holderIdentity", "value": self.identity},
                {"op": "replace", "path": "/spec/holderIdentity", "value": ""},
                {"op": "replace", "path": "/spec/leaseDurationSeconds", "value": 1},
                {"op": "replace", "path": "/spec/renewTime", "value": micro_time()},
            ], content_type=JSON_PATCH)
            log.info("leader election: released Lease %s/%s", self.namespace, LEASE_NAME)
        except (ApiError, OSError) as e:
            log.warning("leader election: release failed: %s", e)


def identity_from_env() -> tuple[str, str] | None:
    """(namespace, identity) when the operator runs with leader election, else None.
    POD_NAMESPACE turns it on (the chart sets it from the downward API); POD_NAME, else the
    host name, is the identity. LORAPLEX_LEADER_ELECTION=false turns it off (local runs)."""
    if os.environ.get("LORAPLEX_LEADER_ELECTION", "").lower() in ("0", "false", "no", "off"):
        return None
    ns = os.environ.get("POD_NAMESPACE")
    if not ns:
        return None
    return ns, os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or f"loraplex-operator-{os.getpid()}"
