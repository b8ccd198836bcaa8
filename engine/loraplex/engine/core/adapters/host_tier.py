"""The host-RAM tier: parsed, scaled adapter weights, bounded in bytes (and in count).

An entry's host copy is *pinned* while it is loading into a slot soon: a request waits for it
(`waiters`) and it has no slot yet, or it is a preload not yet placed, or a warm start lists it
and it has no slot (warming.py: a warm start never evicts what it warmed). Every other copy may be
dropped, least recently used first: an adapter that has a device slot keeps serving from the
slot, and one that has neither goes back to disk (a later request reloads it). Merged adapters,
which have no file to go back to, are not here: merged_cache.py holds them under a budget of
their own, so that they can never pin this tier full.

Every method runs under the manager's lock.
"""
from __future__ import annotations

from collections import OrderedDict

from loraplex.engine.core.adapters.registry import AdapterEntry


def pinned_in_host(entry: AdapterEntry) -> bool:
    return entry.slot is None and (bool(entry.waiters) or entry.manifest.preload or entry.warming)


class HostTier:
    def __init__(self, budget_bytes: int, max_adapters: int):
        self.budget_bytes = budget_bytes
        self.max_adapters = max_adapters
        self.lru: OrderedDict[str, AdapterEntry] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.lru)

    def add(self, entry: AdapterEntry) -> None:
        self.lru[entry.name] = entry
        self.bytes += entry.nbytes

    def touch(self, entry: AdapterEntry) -> None:
        if entry.name in self.lru:
            self.lru.move_to_end(entry.name)

    def drop(self, entry: AdapterEntry) -> None:
        """Forget entry's host copy (its weights go to the garbage collector)."""
        if self.lru.get(entry.name) is entry:
            del self.lru[entry.name]
            self.bytes -= entry.nbytes
        entry.weights = None

    def staged(self) -> int:
        """Host copies pinned for a request or a preload that has no slot yet."""
        return sum(1 for e in self.lru.values() if pinned_in_host(e))

    def over(self, extra_bytes: int = 0) -> bool:
        return self.bytes + extra_bytes > self.budget_bytes or len(self.lru) + (extra_bytes > 0) > self.max_adapters

    def evict(self, extra_bytes: int = 0) -> list[AdapterEntry]:
        """Drop unpinned copies, least recently used first, until `extra_bytes` more fit (or
        nothing more can go). Returns the entries dropped."""
        dropped = []
        for entry in list(self.lru.values()):
            if not self.over(extra_bytes):
                break
            if not pinned_in_host(entry):
                self.drop(entry)
                dropped.append(entry)
        return dropped
