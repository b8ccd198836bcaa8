"""Just-in-time resolution of unregistered adapter names through the default source.

`NameResolver.resolve(name)` returns a Future of the registry name. The work (DefaultSource.locate:
path checks, a stat or a download, a peek at adapter_config.json) runs on its own small pool, so
at most `workers` resolutions run at once (the cap on concurrent dynamic loads) and the HTTP event
loop never blocks. Concurrent requests for one name share one resolution. Names that turned out
unknown (404) or not a checkpoint (422) are remembered for a short while in a bounded negative
cache, so a flood of bad names costs one lookup each per TTL, not one per request. The lookup is
the default source's (sources.DefaultSource) or, on an operator-managed engine, the operator's
catalog (catalog_source.CatalogSource); errors that are worth remembering say so by their status
or by a `negative_cache` attribute (a 503 for an unreachable catalog never is).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from loraplex.engine.core.errors import RequestError

CACHED_STATUSES = (404, 422)


def _fresh(error: RequestError) -> RequestError:
    """A copy without a traceback: a cached exception raised again and again would grow its
    traceback (and keep every frame alive) with each raise."""
    return type(error)(str(error), param=error.param)


class NegativeCache:
    def __init__(self, ttl_seconds: float, max_entries: int):
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self.items: OrderedDict[str, tuple[float, RequestError]] = OrderedDict()
        self.hits = 0

    def get(self, name: str) -> RequestError | None:
        item = self.items.get(name)
        if item is None:
            return None
        expires, error = item
        if time.monotonic() >= expires:
            del self.items[name]
            return None
        self.hits += 1
        return _fresh(error)

    def put(self, name: str, error: RequestError) -> None:
        if self.ttl <= 0 or self.max_entries <= 0:
            return
        self.items.pop(name, None)
        self.items[name] = (time.monotonic() + self.ttl, _fresh(error))
        while len(self.items) > self.max_entries:
            self.items.popitem(last=False)  # oldest first: with one TTL, also the first to expire

    def __len__(self) -> int:
        return len(self.items)


class NameResolver:
    def __init__(self, locate: Callable, register: Callable, workers: int, negative: NegativeCache):
        self.locate = locate  # name -> AdapterManifest (blocking; raises RequestError)
        self.register = register  # (name, manifest) -> registry name
        self.negative = negative
        self.lock = threading.RLock()  # a done future runs its callback at once, inside resolve()
        self.in_flight: dict[str, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-resolve")
        self.lookups = 0  # locate() calls: what a flood of bad names costs the source

    def resolve(self, name: str) -> Future:
        with self.lock:
            error = self.negative.get(name)
            if error is not None:
                future: Future = Future()
                future.set_exception(error)
                return future
            future = self.in_flight.get(name)
            if future is None:
                future = self.pool.submit(self._resolve, name)
                self.in_flight[name] = future
                future.add_done_callback(lambda _f: self._done(name))
            return future

    def _done(self, name: str) -> None:
        with self.lock:
            self.in_flight.pop(name, None)

    def _resolve(self, name: str) -> str:
        with self.lock:
            self.lookups += 1
        try:
            manifest = self.locate(name)
        except RequestError as exc:
            if exc.status in CACHED_STATUSES or getattr(exc, "negative_cache", False):
                with self.lock:
                    self.negative.put(name, exc)
            raise
        return self.register(name, manifest)

    def forget(self, name: str, error: RequestError) -> None:
        """Remember a name whose adapter failed to load (shapes, NaN, ...) as bad for a while."""
        with self.lock:
            self.negative.put(name, error)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
