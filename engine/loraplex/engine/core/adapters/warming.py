"""The manager's side of a warm start (warm_start.py), and what the tiers hold for routers.

A mixin of `AdapterManager` (manager.py): it uses the manager's lock, registry, host tier, slots,
counters and load queue.

- `warm(names)`: load these registered adapters ahead of any request, in this order (hottest
  first). While the warm start lasts, their host copies are pinned (host_tier.pinned_in_host):
  a later warm load waits for room rather than evict an earlier (hotter) one, and preload
  adapters are pinned as ever. Loads beyond the host tier's room stay queued; `warm_progress`
  says so (`stuck`), and the warm start ends early instead of waiting out its budget.
- On the step thread, `_place_warm` copies loaded warm adapters into *free* device slots, hottest
  first: nothing is evicted for them, and a slot they fill is an ordinary one (unpinned, LRU).
- `end_warm()`: the pins go; loads not started are dropped (unless a request waits for them:
  the rest load just in time); the warmed copies become the most recently used of their tiers,
  the hottest last, so that the first evictions take the coldest.
- `residency(cap)`: the adapters in the device and host tiers, most recently used first, for
  the `loraplex_adapter_resident` metric; `on_device()`: those in slots.
"""
from __future__ import annotations

from dataclasses import dataclass

from loraplex.manifest import AdapterState


@dataclass(frozen=True)
class WarmProgress:
    """Where the listed adapters of a warm start stand."""

    listed: int
    resident: int  # in the host tier or a device slot
    settled: int  # resident, failed, or unregistered meanwhile
    stuck: bool  # some wait for a load that no room will let start while the warm start lasts

    @property
    def done(self) -> bool:
        return self.settled >= self.listed or self.stuck


class Warming:
    def warm(self, names: list[str]) -> None:
        """Load the registered adapters `names` ahead of requests, in this order (a revisioned
        name: its revisions that take traffic, newest first)."""
        with self.lock:
            self.warming = [n for n in dict.fromkeys(self._warm_keys(names)) if self.registry.get(n) is not None]
            for name in self.warming:
                entry = self.registry.get(name)
                entry.warming = True
                self._enqueue(entry, prefetch=True)

    def warm_progress(self) -> WarmProgress:
        with self.lock:
            resident = settled = 0
            queued = False
            for name in self.warming:
                entry = self.registry.get(name)
                if entry is None or entry.removed or not entry.warming:
                    settled += 1
                elif entry.slot is not None or entry.weights is not None:
                    resident += 1
                    settled += 1
                elif entry.message is not None:
                    settled += 1
                elif not entry.loading:
                    queued = True
            # Nothing loads, yet some wait: the host tier is full of pinned copies (ours, the
            # preloads', those requests wait for); no load will start before the pins go.
            stuck = queued and self.num_loading == 0
            return WarmProgress(len(self.warming), resident, settled, stuck)

    def end_warm(self) -> None:
        with self.lock:
            names, self.warming = self.warming, []
            for name in reversed(names):  # the hottest ends as the most recently used
                entry = self.registry.get(name)
                if entry is None or not entry.warming:
                    continue
                entry.warming = False
                if not entry.waiters and not entry.manifest.preload:
                    self.prefetch_queue.pop(name, None)
                if entry.slot is not None:
                    self.slots.lru.move_to_end(entry.slot)
                self.host.touch(entry)
            self._pump()

    def _place_warm(self) -> None:
        """Loaded warm adapters into free device slots, hottest first (step thread, lock held)."""
        for name in self.warming:
            entry = self.registry.get(name)
            if entry is None or entry.removed or entry.weights is None or entry.slot is not None:
                continue
            slot = self.slots.take_free()
            if slot is None:
                return
            self.slots.write(slot, entry.weights)
            self.slots.assign(slot, entry)
            self.counters.load("device", "ok")

    def residency(self, cap: int) -> tuple[list[tuple[str, str]], int]:
        """([(name, tier)] of the adapters in a device slot or the host tier, the most recently
        used first, at most `cap`; how many more there are). A dynamic adapter goes by the name
        requests use, a revision by its adapter's name (one row per name and tier: the most
        recently used revision's); merged adapters (per-request merges) are left out."""
        with self.lock:
            rows = [(e.used_at, e.public_name, e.state) for e in self.registry
                    if not e.merged and not e.removed and e.state in (AdapterState.DEVICE, AdapterState.HOST)]
        rows.sort(key=lambda r: (-r[0], r[1]))
        unique = list(dict.fromkeys((name, state.value) for _, name, state in rows))  # the first: most recent
        return unique[:cap], max(0, len(unique) - cap)

    def on_device(self) -> list[str]:
        """The adapters in device slots (at most --max-active-adapters of them), by name."""
        with self.lock:
            return sorted({o.public_name for o in self.slots.owner if o is not None and not o.merged})
