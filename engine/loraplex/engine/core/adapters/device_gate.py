"""The scheduler's side of the adapter manager (scheduler.AdapterGate): device slots for waiting
sequences, pins for running ones, and what the step loop and the metrics read about waiting.

A mixin of `AdapterManager` (manager.py): it uses the manager's lock, registry, host tier, slots,
counters and load queue. Every method but `router_view` and `waiting_counts` runs on the step
thread, so slot writes never race a forward pass.
"""
from __future__ import annotations

import time

from loraplex.engine.core.adapters.registry import AdapterEntry


class DeviceGate:
    def acquire(self, seq) -> bool:
        """Give seq's adapter a device slot and pin it. False: not possible yet (still loading,
        or every slot is pinned); the scheduler retries next step."""
        if seq.adapter is None:
            seq.lora_slot, seq.lora_rank = -1, 0
            return True
        with self.lock:
            entry = self.registry.get(seq.adapter)
            if entry is None or entry.removed:
                return False
            self.registry.touch(entry)
            if entry.slot is None:
                if entry.weights is None:
                    self._enqueue(entry)
                    return False
                if not self._place(entry):
                    return False
            self.slots.pin(entry.slot)
            entry.used_at = time.monotonic()
            self.host.touch(entry)
            self.merged.touch(entry)
            entry.waiters.discard(seq.request_id)
            seq.lora_slot, seq.lora_rank = entry.slot, entry.rank
            seq.adapter_digest = entry.digest
            return True

    def waiting_for_slot(self, seq) -> bool:
        """seq's adapter is loaded, but no device slot can take it now (every one is pinned)."""
        with self.lock:
            entry = self.registry.get(seq.adapter) if seq.adapter else None
            return entry is not None and entry.slot is None and entry.weights is not None

    def load_overdue(self, seq, now: float) -> bool:
        """seq has not started, has waited --adapter-wait-timeout-seconds since it arrived, and its
        adapter is still not loaded (not in RAM, not in a slot): the step loop ends it instead of
        letting it hang. A preempted sequence (it has streamed output already) is never ended so."""
        if seq.adapter is None or seq.first_scheduled_time is not None \
                or now - seq.arrival_time < self.config.adapter_wait_timeout_seconds:
            return False
        with self.lock:
            entry = self.registry.get(seq.adapter)
            return entry is not None and entry.weights is None and entry.slot is None

    def holds_a_free_slot_hostage(self, seq) -> bool:
        """Admitting seq would pin a slot that another adapter could otherwise get: true for any
        adapter but a preload (preload slots are never given to others anyway)."""
        if seq.adapter is None:
            return False
        with self.lock:
            entry = self.registry.get(seq.adapter)
            return entry is None or not entry.manifest.preload

    def release(self, seq) -> None:
        """seq gave its slot back: it finished or was aborted (its waiting mark goes too), or it
        waits again (preempted, or admitted but then short of KV blocks: it is marked again)."""
        with self.lock:
            entry = self.registry.get(seq.adapter) if seq.adapter else None
            if entry is not None:
                if seq.is_finished:
                    entry.waiters.discard(seq.request_id)
                else:
                    entry.waiters.add(seq.request_id)
            if seq.lora_slot >= 0:
                slot = seq.lora_slot
                seq.lora_slot = -1
                owner = self.slots.owner[slot]
                if self.slots.unpin(slot) == 0 and owner is not None and owner.removed:
                    self.slots.free(slot)
            if entry is not None:
                self._forget_if_done(entry)

    def on_step(self) -> None:
        """Start loads that waited for room; place loaded preload adapters, and those of a warm
        start in free slots; once a second, forget dynamic entries that hold nothing (step thread)."""
        with self.lock:
            self._pump()
            now = time.monotonic()
            if now - self.last_sweep >= 1.0:
                self.last_sweep = now
                for entry in self.registry.sweep():
                    self._remember_failure(entry)
                self._sweep_revisions()
            for name in list(self.pending_placement):
                entry = self.registry.get(name)
                if entry is None or entry.weights is None or entry.slot is not None or self._place(entry):
                    self.pending_placement.discard(name)
            if self.warming:
                self._place_warm()

    def _place(self, entry: AdapterEntry) -> bool:
        taken = self.slots.take()
        if taken is None:
            return False
        slot, evicted = taken
        if evicted is not None:
            self.counters.evict("device")
            self._forget_if_done(evicted)
        self.slots.write(slot, entry.weights)
        self.slots.assign(slot, entry)
        self.counters.load("device", "ok")
        return True

    def router_view(self) -> tuple[list[str], list[str]]:
        """(adapters of running sequences, adapters of waiting sequences not yet admitted): what
        vllm:lora_requests_info reports. Dynamic adapters go by the name requests use, revisions by their adapter's."""
        with self.lock:
            running = sorted({o.public_name for s, o in enumerate(self.slots.owner)
                              if o is not None and self.slots.pins[s]})
            waiting = sorted({e.public_name for e in self.registry if e.waiters})
            return running, waiting

    def waiting_counts(self) -> dict[str, int]:
        """Requests waiting on their adapter, by reason: `load` (not in RAM nor on the device yet:
        queued for a load, or loading) and `slot` (loaded, no device slot free yet). Requests whose
        adapter has its slot and that wait for KV blocks are not counted."""
        counts = {"load": 0, "slot": 0}
        with self.lock:
            for entry in self.registry:
                if entry.waiters and entry.slot is None:
                    counts["slot" if entry.weights is not None else "load"] += len(entry.waiters)
        return counts
