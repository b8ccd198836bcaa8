"""The operator's in-memory state, kept in kopf's `memo`: clients, wake-ups, the Secret cache, and
the typed state of each concern (owned.py, sync.py, placement.py, scaling.py, demand.py,
revisionhealth.py, scaletozero.py, publish.py, tenants.py).

Nothing here is the source of truth: after a restart everything is rebuilt from the API (kopf's
indexes) and from the custom resources' status, so memory only saves calls.
"""
from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Iterable

from .config import OperatorConfig, catalog_url_from_env, engine_image_prefixes_from_env
from .demand import AdapterRates
from .engine_client import EngineClient
from .constants import Key
from .kube import KubeClient, Ref
from .owned import OwnedState
from .placement import PlacementMemory
from .publish import StatusMemory
from .revisionhealth import RevisionCounters
from .scaletozero import ZeroState
from .scaling import ScaleMemory
from .sync import SyncState
from .tenants import TenantState


@dataclass(frozen=True)
class Wake:
    """What a loop waits on: `base` (its base, its adapters, its Deployment changed) or `pods`
    (one of its engine pods changed), for the base `namespace/name`."""

    topic: str
    namespace: str
    name: str | None


class Wakers:
    """Events that wake the per-base loops (daemons) early: a pod became ready, an adapter
    was added, a spec changed. One waiter may listen on several keys."""

    def __init__(self) -> None:
        self._by_key: dict[Wake, set[asyncio.Event]] = collections.defaultdict(set)

    def register(self, keys: Iterable[Wake]) -> asyncio.Event:
        ev = asyncio.Event()
        for k in keys:
            self._by_key[k].add(ev)
        return ev

    def unregister(self, ev: asyncio.Event) -> None:
        for k in list(self._by_key):
            self._by_key[k].discard(ev)
            if not self._by_key[k]:
                del self._by_key[k]

    def wake(self, *keys: Wake) -> None:
        for k in keys:
            for ev in self._by_key.get(k, ()):
                ev.set()

    @staticmethod
    async def sleep(ev: asyncio.Event, timeout: float) -> bool:
        """Sleep until woken or `timeout`; True when woken."""
        try:
            await asyncio.wait_for(ev.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            ev.clear()


@dataclass(frozen=True)
class CachedSecret:
    at: float
    body: dict | None


class Runtime:
    def __init__(self, config: OperatorConfig):
        self.config = config
        self.catalog_url = catalog_url_from_env()  # rendered into the engines (render.engine_args)
        self.engine_images = engine_image_prefixes_from_env()  # allowed engine images (podpolicy.py)
        self._kube: KubeClient | None = None
        self._old_kubes: list[KubeClient] = []
        self.engine = EngineClient(timeout=config.engine_timeout, connect_timeout=config.engine_connect_timeout,
                                   max_connections=config.push_concurrency + config.pod_concurrency + 16)
        self.wakers = Wakers()
        # One typed state per concern (each module says what its state holds).
        self.owned = OwnedState()             # owned.py: the last application of each base's objects
        self.sync = SyncState()               # sync.py: manifests, per-pod records, unloads, last pass
        self.placements = PlacementMemory()   # placement.py: where each adapter was placed
        self.scaling = ScaleMemory()          # scaling.py: the autoscaler's history per base
        # demand.py: per base the adapters' request rates (req/s over all pods) and the warm
        # counts of the `replicas: auto` adapters; the adapter catalog reads it (of_base, rate).
        self.adapter_rates = AdapterRates()
        # revisionhealth.py: per base the revisioned adapters' counters per revision and Ready
        # pod; a rollout's analysis reads them (revision_health).
        self.revision_counters = RevisionCounters()
        self.zero = ZeroState()               # scaletozero.py: each base's way back from zero
        self.status = StatusMemory()          # publish.py: this operator's own last status writes
        self.tenants = TenantState()          # tenants.py: the last rendering of each base's API keys
        self._secrets: dict[Key, CachedSecret] = {}

    # --- Kubernetes client, made at each kopf login (handlers.login) ----------------------------
    def set_client(self, kube: KubeClient) -> None:
        if self._kube is not None:
            self._old_kubes.append(self._kube)  # calls may still be in flight on it: closed at exit
        self._kube = kube

    @property
    def kube(self) -> KubeClient:
        if self._kube is None:
            raise RuntimeError("not logged in to Kubernetes yet")
        return self._kube

    async def get_secret(self, namespace: str, name: str) -> dict | None:
        """A Secret, cached for a few seconds (many adapters may share one)."""
        ttl = self.secret_ttl
        now = time.monotonic()
        hit = self._secrets.get(Key(namespace, name))
        if hit is not None and now - hit.at < ttl:
            return hit.body
        body = await self.kube.get(Ref("v1", "secrets", namespace, name))
        self._secrets[Key(namespace, name)] = CachedSecret(now, body)
        return body

    @property
    def secret_ttl(self) -> float:
        # Many adapters share few Secrets: each is read at most once per resync interval (a
        # rotated key reaches the engines within one interval).
        return max(self.config.resync_interval, 1.0)

    def forget_secret(self, namespace: str, name: str) -> None:
        self._secrets.pop(Key(namespace, name), None)

    async def aclose(self) -> None:
        await self.engine.aclose()
        for k in [self._kube, *self._old_kubes]:
            if k is not None:
                await k.aclose()
