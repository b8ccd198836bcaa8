"""Who may ask the adapter catalog, decided in memory before any API read: the admin tokens of
the bases this operator serves, and a token bucket per caller.

The catalog used to read a base and its admin-token Secret from the API to learn whether the
bearer token was right, so each made-up base name cost API GETs and pushed real entries out
of its cache (issue 20, finding 7). Now every replica keeps a table of the bases it serves,
refreshed in the background (one LIST of BaseModelDeployments per watched namespace, or one
cluster-wide, every `catalog_refresh_interval` seconds; their admin-token Secrets through the
runtime's Secret cache), and a request is authenticated against that table: an unknown base or
a wrong token costs no API call. The price: a new base, or a rotated token, is known to the
catalog one refresh later (the engines retry a 403 as "catalog unavailable").

Every request is then charged to its caller: the base (namespace/name) when the token is one
of its admin tokens, else the client's address. A caller past its bucket gets 429 with
Retry-After. Bases are the catalog's tenants: anonymous traffic that an engine forwards (names
nobody registered) spends its own base's bucket, never another base's.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from . import adapters as A
from . import constants as C
from .constants import Key
from .kube import ApiError, Ref
from .runtime import Runtime

log = logging.getLogger("loraplex.operator.catalog")

CALLERS_TRACKED = 4096  # buckets kept; a caller forgotten (least recently seen) starts full again


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class KnownBase:
    """A base as the last refresh found it: the sha256 of its admin token, and its body."""

    token_digest: bytes
    body: dict


class TokenTable:
    """Per base (namespace, name): its KnownBase, from the last refresh.

    `namespaces`: the watched namespaces (config.watch_namespaces), None for all of them."""

    def __init__(self, namespaces: tuple[str, ...] | None):
        self.namespaces = namespaces
        self.bases: dict[Key, KnownBase] = {}
        self.loaded = False  # one refresh has succeeded: until then nobody can be authenticated

    async def refresh(self, rt: Runtime) -> None:
        table: dict[Key, KnownBase] = {}
        for ns in self.namespaces or (None,):
            try:
                bases = await rt.kube.list(Ref(C.API_VERSION, C.BMD_PLURAL, ns))
            except ApiError as e:
                if e.status != 403:
                    raise
                # A namespace this operator may not read has none of its bases.
                log.warning("catalog: may not list BaseModelDeployments in %s: %s", ns or "all namespaces", e)
                continue
            for base in bases:
                meta = base.get("metadata") or {}
                if meta.get("deletionTimestamp") or not meta.get("name") or not meta.get("namespace"):
                    continue
                ref = A.admin_token_ref(base.get("spec"), meta["name"])
                secret = await rt.get_secret(meta["namespace"], ref.name)
                if secret is None:
                    # The leader creates it right after the base: look again next refresh,
                    # not only when the Secret cache's entry expires.
                    rt.forget_secret(meta["namespace"], ref.name)
                    continue
                try:
                    table[Key(meta["namespace"], meta["name"])] = KnownBase(_digest(A.admin_token(ref, secret)), base)
                except A.SpecProblem:
                    continue  # no usable token: its engines cannot be told apart from strangers
        self.bases, self.loaded = table, True

    def authenticate(self, namespace: str, base: str, token: str) -> dict | None:
        """The base's body when `token` is its admin token, else None. No I/O."""
        entry = self.bases.get(Key(namespace, base))
        if entry is None:
            return None
        return entry.body if hmac.compare_digest(entry.token_digest, _digest(token)) else None

    async def keep_fresh(self, rt: Runtime, interval: float) -> None:
        """Refresh forever (a task of the catalog's server); a failed refresh keeps the last table."""
        while True:
            try:
                await self.refresh(rt)
            except (ApiError, OSError, RuntimeError) as e:  # API down, or not logged in yet
                log.warning("catalog: could not refresh the bases' admin tokens: %s", e)
            await asyncio.sleep(interval)


class CallerLimits:
    """A token bucket per caller: `rate` requests a second on average, up to `burst` at once.
    At most `max_callers` buckets are kept (least recently used out), so a flood of distinct
    callers costs bounded memory; a forgotten caller only gets a full bucket back."""

    def __init__(self, rate: float, burst: int, max_callers: int = CALLERS_TRACKED):
        self.rate, self.burst, self.max_callers = float(rate), float(burst), max_callers
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # caller -> (tokens, time)

    def take(self, caller: str, now: float | None = None) -> float:
        """Spend one request of `caller`: 0 when allowed, else the seconds until it would be."""
        now = time.monotonic() if now is None else now
        tokens, then = self.buckets.pop(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[caller] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self.buckets) > self.max_callers:
            self.buckets.popitem(last=False)
        return wait

    @staticmethod
    def retry_after(wait: float) -> int:
        return max(1, math.ceil(wait))
