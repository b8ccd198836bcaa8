"""Merged adapters' weights (LoRAX `merged_adapters`, merge.py): their own RAM budget, and the cap
on merges being built at once.

A merge has no file to reload it from, so its copy cannot go back to disk as a host-tier copy
can. Kept in the host tier it had to be pinned there, and enough distinct merges left no room for
any other adapter to load: every other request waited forever. So merged copies live here, beside
the host tier, under their own byte budget (--adapter-merged-bytes) and at most MAX_MERGED of
them. A new merge pushes out the least recently used ones that no request is using (a merge with
waiting requests, or made or used in the last IN_USE_GRACE_SECONDS, stays); when the older merges
are all in use, the new one is refused with 429 and Retry-After. At most --max-concurrent-merges
merges are built at once; a request over that cap is refused the same way.

Every method but `building` runs under the manager's lock.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict

from loraplex.engine.core.adapters.registry import AdapterEntry
from loraplex.engine.core.errors import RequestError

MAX_MERGED = 16  # merged adapters kept, whatever their size
IN_USE_GRACE_SECONDS = 5.0  # a merge just made or found: its request is on its way to the queue


class MergeCapacityError(RequestError):
    """Merging is busy (too many merges being built, or the budget holds only merges in use)."""

    status = 429
    code = "merge_capacity"
    retry_after = 2


class MergeTooLargeError(RequestError):
    status = 400
    code = "merge_too_large"


class MergedCache:
    def __init__(self, budget_bytes: int, max_concurrent: int):
        self.budget_bytes = budget_bytes
        self.max_concurrent = max_concurrent
        self.lru: OrderedDict[str, AdapterEntry] = OrderedDict()
        self.bytes = 0
        self.used_at: dict[str, float] = {}
        self._builders = threading.BoundedSemaphore(max_concurrent)

    @contextlib.contextmanager
    def building(self):
        """Hold one of the --max-concurrent-merges building places, or raise MergeCapacityError."""
        if not self._builders.acquire(blocking=False):
            raise MergeCapacityError(f"{self.max_concurrent} adapter merges are being built already "
                                     "(--max-concurrent-merges); retry shortly", param="merged_adapters")
        try:
            yield
        finally:
            self._builders.release()

    def touch(self, entry: AdapterEntry) -> None:
        if self.lru.get(entry.name) is entry:
            self.lru.move_to_end(entry.name)
            self.used_at[entry.name] = time.monotonic()

    def make_room(self, nbytes: int) -> list[AdapterEntry]:
        """The merges to unregister so that one of `nbytes` more fits: least recently used first,
        none that is in use. Raises when it cannot fit now (429) or ever (400)."""
        if nbytes > self.budget_bytes:
            raise MergeTooLargeError(f"the merged adapter would take {nbytes} bytes, over the {self.budget_bytes} "
                                     "bytes of --adapter-merged-bytes", param="merged_adapters.ids")
        now = time.monotonic()
        victims, freed, count = [], 0, len(self.lru)
        for name, entry in self.lru.items():
            if self.bytes - freed + nbytes <= self.budget_bytes and count < MAX_MERGED:
                break
            if entry.waiters or now - self.used_at.get(name, 0.0) < IN_USE_GRACE_SECONDS:
                continue
            victims.append(entry)
            freed += entry.nbytes
            count -= 1
        if self.bytes - freed + nbytes > self.budget_bytes or count >= MAX_MERGED:
            raise MergeCapacityError("the merged adapters' memory (--adapter-merged-bytes) is held by merges in use; "
                                     "retry shortly", param="merged_adapters")
        return victims

    def add(self, entry: AdapterEntry) -> None:
        self.lru[entry.name] = entry
        self.used_at[entry.name] = time.monotonic()
        self.bytes += entry.nbytes

    def drop(self, entry: AdapterEntry) -> None:
        if self.lru.get(entry.name) is entry:
            del self.lru[entry.name]
            del self.used_at[entry.name]
            self.bytes -= entry.nbytes
