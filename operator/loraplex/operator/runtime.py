"""The operator's in-memory state, kept in kopf's `memo`: clients, wake-ups, per-pod records.

Nothing here is the source of truth: after a restart everything is rebuilt from the API (kopf's
indexes) and from the custom resources' status, so memory only saves calls.
"""
from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Hashable, Iterable

from .fleet import PodMemory, PodRecord
from .config import OperatorConfig, catalog_url_from_env, engine_image_prefixes_from_env
from .engine_client import EngineClient
from .kube import KubeClient, Ref


class Wakers:
    """Events that wake the per-object loops (daemons) early: a pod became ready, an adapter
    was added, a spec changed. One waiter may listen on several keys."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, set[asyncio.Event]] = collections.defaultdict(set)

    def register(self, keys: Iterable[Hashable]) -> asyncio.Event:
        ev = asyncio.Event()
        for k in keys:
            self._by_key[k].add(ev)
        return ev

    def unregister(self, ev: asyncio.Event) -> None:
        for k in list(self._by_key):
            self._by_key[k].discard(ev)
            if not self._by_key[k]:
                del self._by_key[k]

    def wake(self, *keys: Hashable) -> None:
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
        self._locks: dict[Hashable, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        # (namespace, adapter) -> pod name -> record
        self.records: dict[tuple[str, str], dict[str, PodRecord]] = {}
        # (namespace, adapter) -> pods it is placed on
        self.placements: dict[tuple[str, str], list[str]] = {}
        # (namespace, adapter) -> (spec stamp, manifest or SpecProblem): rebuilt on a spec change
        self.manifests: dict[tuple[str, str], tuple[Any, Any]] = {}
        # uid -> monotonic time of adapters whose deletion handler unloaded them (reconcile.unload_adapter)
        self.unloaded: dict[str, float] = {}
        # (namespace, base, pod) -> boot id and backoff of that pod's engine
        self.pod_memory: dict[tuple[str, str, str], PodMemory] = {}
        # (namespace, base) -> what the last pass did, and the adapters by phase
        self.last_pass: dict[tuple[str, str], dict] = {}
        self.phase_counts: dict[tuple[str, str], dict[str, int]] = {}
        # (namespace, base) -> autoscaler recommendation history
        self.scale_history: dict[tuple[str, str], tuple[tuple[float, int], ...]] = {}
        # (namespace, base) -> last generation seen (wake the adapters on a spec change only)
        self.seen_generations: dict[tuple[str, str], Any] = {}
        # (plural, namespace, name) -> (monotonic time, status last written by this operator)
        self.written_status: dict[tuple[str, str, str], tuple[float, dict]] = {}
        # (namespace, base) -> (stamp, time, InferencePool condition, Deployment, render error) of
        # the last application of its owned objects; bases whose owned objects had an event since
        self.owned_applied: dict[tuple[str, str], tuple] = {}
        self.owned_stale: set[tuple[str, str]] = set()
        # (monotonic time, whether the InferencePool CRD is installed)
        self.pool_discovery: tuple[float, bool] | None = None
        self._secrets: dict[tuple[str, str], tuple[float, dict | None]] = {}

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

    def lock(self, key: Hashable) -> asyncio.Lock:
        return self._locks[key]

    def forget_unloaded(self, uid: str | None, keep_seconds: float = 600.0) -> None:
        """Note an unloaded adapter's uid; drop notes older than any pass's snapshot can be."""
        now = time.monotonic()
        for old in [u for u, t in self.unloaded.items() if now - t > keep_seconds]:
            del self.unloaded[old]
        if uid:
            self.unloaded[uid] = now

    async def get_secret(self, namespace: str, name: str) -> dict | None:
        """A Secret, cached for a few seconds (many adapters may share one)."""
        ttl = self.secret_ttl
        now = time.monotonic()
        hit = self._secrets.get((namespace, name))
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        body = await self.kube.get(Ref("v1", "secrets", namespace, name))
        self._secrets[(namespace, name)] = (now, body)
        return body

    @property
    def secret_ttl(self) -> float:
        # Many adapters share few Secrets: each is read at most once per resync interval (a
        # rotated key reaches the engines within one interval).
        return max(self.config.resync_interval, 1.0)

    def forget_secret(self, namespace: str, name: str) -> None:
        self._secrets.pop((namespace, name), None)

    async def aclose(self) -> None:
        await self.engine.aclose()
        for k in [self._kube, *self._old_kubes]:
            if k is not None:
                await k.aclose()
