"""The adapter registry and its tiered cache: device slots, host RAM, disk.

- Disk: the adapter's folder (local, or the Hub/S3 download cache). Always there once fetched.
- Host: parsed, scaled weights in RAM, LRU-bounded by --max-cpu-adapters.
- Device: one of --max-active-adapters slots in the model's stacked LoRA buffers, LRU.

Loads (fetch + parse) run on a thread pool, never on the step loop. Copies into a device slot
run on the step thread (inside `acquire`/`on_step`), so they never race a forward pass.
A slot in use by a running sequence is pinned; a `preload` adapter is never evicted.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplex.engine.core.adapters.checkpoint import AdapterFormatError, AdapterWeights, load_adapter
from loraplex.engine.core.adapters.sources import AdapterSourceError, fetch_adapter
from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.errors import AdapterUnavailableError, RequestError, UnknownAdapterError
from loraplex.manifest import AdapterManifest, AdapterState
from loraplex.engine.model.config import ModelConfig

log = logging.getLogger("loraplex.adapters")
MAX_MERGED = 16  # merged adapters kept (their weights live only in RAM)


@dataclass
class AdapterEntry:
    manifest: AdapterManifest
    generation: int  # bumped when the manifest's content changes: stale loads are dropped
    weights: AdapterWeights | None = None
    slot: int | None = None
    loading: bool = False
    message: str | None = None  # why the last load failed
    removed: bool = False  # unregistered while pinned: its slot frees when the last user leaves
    wanted: bool = False  # a request waits for it: keep its host copy until it gets a slot
    load_seconds: float | None = None
    merged: bool = False  # a per-request merge (merge.py): weights made in RAM, nothing to fetch

    @property
    def state(self) -> AdapterState:
        if self.slot is not None:
            return AdapterState.DEVICE
        if self.weights is not None:
            return AdapterState.HOST
        if self.loading:
            return AdapterState.LOADING
        if self.message is not None:
            return AdapterState.FAILED
        return AdapterState.REGISTERED


@dataclass
class AdapterCounters:
    """Monotonic counters read by the metrics layer."""

    loads: dict[tuple[str, str], int] = field(default_factory=dict)  # (tier, result) -> count
    load_seconds: list[float] = field(default_factory=list)  # drained by the metrics layer
    evictions: dict[str, int] = field(default_factory=dict)  # tier -> count

    def load(self, tier: str, result: str) -> None:
        self.loads[(tier, result)] = self.loads.get((tier, result), 0) + 1

    def evict(self, tier: str) -> None:
        self.evictions[tier] = self.evictions.get(tier, 0) + 1


def _content(m: AdapterManifest) -> tuple:
    return (m.source, m.uri, m.revision, m.sha256)


class AdapterManager:
    def __init__(self, config: EngineConfig, model, model_config: ModelConfig):
        if config.max_active_adapters < 1:
            raise ValueError("--max-active-adapters must be at least 1")
        self.config = config
        self.model_config = model_config
        self.dtype = next(model.parameters()).dtype
        self.projections = list(model.lora_projections())
        self.num_slots = config.max_active_adapters
        self.adapter_dir = Path(config.adapter_dir) if config.adapter_dir else None
        self.cache_dir = Path(config.adapter_cache_dir) if config.adapter_cache_dir else None
        self.lock = threading.RLock()
        self.entries: dict[str, AdapterEntry] = {}
        self.host_lru: OrderedDict[str, None] = OrderedDict()  # names with weights in RAM
        self.slot_owner: list[AdapterEntry | None] = [None] * self.num_slots
        self.slot_pins = [0] * self.num_slots
        self.slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(self.num_slots))
        self.pending_placement: set[str] = set()  # preloads waiting for the step thread
        self.counters = AdapterCounters()
        self.pool = ThreadPoolExecutor(max_workers=config.adapter_load_workers, thread_name_prefix="adapter-load")
        self._generation = 0
        self.merged_lru: OrderedDict[str, None] = OrderedDict()  # merged adapters, oldest first

    # ---- registry (any thread) ------------------------------------------------------------

    def register(self, manifest: AdapterManifest) -> dict:
        """Add or update an adapter. Idempotent: the same manifest again changes nothing,
        except that a failed adapter is retried."""
        with self.lock:
            entry = self.entries.get(manifest.name)
            if manifest.preload and (entry is None or not entry.manifest.preload):
                pinned = sum(1 for e in self.entries.values() if e.manifest.preload and not e.removed)
                if pinned + 1 >= self.num_slots:
                    raise RequestError(
                        f"cannot preload {manifest.name!r}: {pinned} of {self.num_slots} device slots are held by "
                        "preloaded adapters and one must stay free for on-demand adapters; raise --max-active-adapters",
                        param="preload")
            if entry is None or entry.removed or _content(entry.manifest) != _content(manifest):
                if entry is not None:
                    self._drop(entry)
                self._generation += 1
                entry = AdapterEntry(manifest=manifest, generation=self._generation)
                self.entries[manifest.name] = entry
            else:
                entry.manifest = manifest  # tenants or preload changed: no reload needed
                if entry.state == AdapterState.FAILED:
                    entry.message = None
            if manifest.preload:
                self._start_load(entry)
                if entry.weights is not None and entry.slot is None:
                    self.pending_placement.add(manifest.name)
            return self.describe(entry)

    def unregister(self, name: str) -> bool:
        with self.lock:
            entry = self.entries.pop(name, None)
            if entry is None:
                return False
            self._drop(entry)
            self.merged_lru.pop(name, None)
            return True

    def register_merged(self, name: str, weights: AdapterWeights, tenants: list[str]) -> None:
        """Add a merged adapter (merge.py) whose host weights are given. It stays in RAM (never
        evicted to disk: there is no file) until MAX_MERGED newer merges push it out; then it is
        unregistered (its slot frees when its last running request ends) and made again on need."""
        with self.lock:
            if name in self.entries:
                if name in self.merged_lru:
                    self.merged_lru.move_to_end(name)
                return
            manifest = AdapterManifest(name=name, source="local", uri=f"merged/{name}", tenants=tenants)
            self._generation += 1
            self.entries[name] = AdapterEntry(manifest=manifest, generation=self._generation, weights=weights,
                                              merged=True)
            self.host_lru[name] = None
            self.merged_lru[name] = None
            while len(self.merged_lru) > MAX_MERGED:
                self.unregister(next(iter(self.merged_lru)))

    def host_weights(self, name: str) -> AdapterWeights | None:
        """The adapter's weights if RAM holds them (merges read their sources through this)."""
        with self.lock:
            entry = self.entries.get(name)
            return entry.weights if entry is not None else None

    def _drop(self, entry: AdapterEntry) -> None:
        """Forget an entry's weights; its slot frees now, or when its last running user leaves."""
        entry.removed = True
        entry.weights = None
        self.host_lru.pop(entry.manifest.name, None)
        self.pending_placement.discard(entry.manifest.name)
        if entry.slot is not None and self.slot_pins[entry.slot] == 0:
            self._free_slot(entry.slot)

    def describe(self, entry: AdapterEntry) -> dict:
        return {
            "name": entry.manifest.name, "state": entry.state.value, "message": entry.message,
            "rank": entry.weights.rank if entry.weights else None,
            "target_modules": list(entry.weights.target_modules) if entry.weights else None,
            "load_seconds": entry.load_seconds, "manifest": entry.manifest.model_dump(exclude_none=True),
        }

    def get(self, name: str) -> dict | None:
        with self.lock:
            entry = self.entries.get(name)
            return self.describe(entry) if entry else None

    def list(self) -> list[dict]:
        with self.lock:
            return [self.describe(e) for e in sorted(self.entries.values(), key=lambda e: e.manifest.name)]

    def manifest(self, name: str) -> AdapterManifest | None:
        with self.lock:
            entry = self.entries.get(name)
            return entry.manifest if entry else None

    def check_servable(self, name: str) -> None:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                raise UnknownAdapterError(f"the model {name!r} does not exist", param="model")
            if entry.state == AdapterState.FAILED:
                raise AdapterUnavailableError(f"adapter {name!r} failed to load: {entry.message}", param="model")

    def failure(self, name: str) -> str | None:
        """Why requests for `name` cannot run (None: they can, now or once loaded)."""
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                return "the adapter was unregistered"
            return entry.message if entry.state == AdapterState.FAILED else None

    def preload_ready(self) -> tuple[bool, list[str]]:
        """(all preloaded adapters on the device, the names still missing)."""
        with self.lock:
            missing = [n for n, e in self.entries.items() if e.manifest.preload and e.state != AdapterState.DEVICE]
            return not missing, sorted(missing)

    def tier_counts(self) -> dict[str, int]:
        with self.lock:
            counts = {s.value: 0 for s in AdapterState}
            for e in self.entries.values():
                counts[e.state.value] += 1
            return counts

    # ---- loading (thread pool) ------------------------------------------------------------

    def request_load(self, name: str) -> None:
        with self.lock:
            entry = self.entries.get(name)
            if entry is not None:
                entry.wanted = True
                self._start_load(entry)

    def _start_load(self, entry: AdapterEntry) -> None:
        if entry.weights is None and not entry.loading and entry.message is None:
            entry.loading = True
            self.pool.submit(self._load, entry)

    def _load(self, entry: AdapterEntry) -> None:
        t0 = time.perf_counter()
        tier = "disk" if entry.manifest.source == "local" else entry.manifest.source
        weights, message = None, None
        try:
            path = fetch_adapter(entry.manifest, self.adapter_dir, self.cache_dir)
            weights = load_adapter(path, self.model_config, self.config.max_lora_rank, self.dtype)
            if self.config.resolve_device().type == "cuda":
                weights.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.weights.items()}
        except (AdapterFormatError, AdapterSourceError) as exc:
            message = str(exc)
        except Exception as exc:  # anything else is still this adapter's failure, not the engine's
            log.exception("loading adapter %s failed", entry.manifest.name)
            message = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        with self.lock:
            entry.loading = False
            if entry.removed:
                return
            self.counters.load(tier, "error" if message else "ok")
            if message:
                entry.message = message
                log.warning("adapter %s failed to load: %s", entry.manifest.name, message)
                return
            entry.weights, entry.load_seconds = weights, seconds
            self.counters.load_seconds.append(seconds)
            self.host_lru[entry.manifest.name] = None
            self._evict_host()
            if entry.manifest.preload:
                self.pending_placement.add(entry.manifest.name)

    def _evict_host(self) -> None:
        """Keep at most max_cpu_adapters in RAM: drop the least recently used that no slot
        holds, no preload pins and no waiting request wants (dropping those would make loads
        chase each other). Their files stay on disk; a later request reloads them."""
        excess = len(self.host_lru) - self.config.max_cpu_adapters
        for name in list(self.host_lru):
            if excess <= 0:
                break
            e = self.entries[name]
            if e.slot is None and not e.manifest.preload and not e.wanted and not e.merged:
                e.weights = None
                del self.host_lru[name]
                self.counters.evict("host")
                excess -= 1

    # ---- device slots (step thread only) --------------------------------------------------

    def acquire(self, seq) -> bool:
        """Give seq's adapter a device slot and pin it. False: not possible yet (still loading,
        or every slot is pinned); the scheduler retries next step."""
        if seq.adapter is None:
            seq.lora_slot, seq.lora_rank = -1, 0
            return True
        with self.lock:
            entry = self.entries.get(seq.adapter)
            if entry is None or entry.removed:
                return False
            if entry.slot is None:
                entry.wanted = True
                if entry.weights is None:
                    self._start_load(entry)
                    return False
                if not self._place(entry):
                    return False
            self.slot_pins[entry.slot] += 1
            self.slot_lru.move_to_end(entry.slot)
            self.host_lru.move_to_end(entry.manifest.name)
            seq.lora_slot, seq.lora_rank = entry.slot, entry.weights.rank if entry.weights else 0
            seq.adapter_digest = entry.weights.digest if entry.weights else None
            return True

    def release(self, seq) -> None:
        if seq.lora_slot < 0:
            return
        with self.lock:
            slot = seq.lora_slot
            self.slot_pins[slot] -= 1
            seq.lora_slot = -1
            owner = self.slot_owner[slot]
            if owner is not None and owner.removed and self.slot_pins[slot] == 0:
                self._free_slot(slot)

    def on_step(self) -> None:
        """Place loaded preload adapters into device slots (called by the step thread)."""
        with self.lock:
            for name in list(self.pending_placement):
                entry = self.entries.get(name)
                if entry is None or entry.weights is None or entry.slot is not None or self._place(entry):
                    self.pending_placement.discard(name)

    def _place(self, entry: AdapterEntry) -> bool:
        slot = self._free_or_evictable_slot()
        if slot is None:
            return False
        self._write_slot(slot, entry.weights)
        self.slot_owner[slot], entry.slot = entry, slot
        entry.wanted = False
        self.slot_lru.move_to_end(slot)
        self.counters.load("device", "ok")
        return True

    def _free_or_evictable_slot(self) -> int | None:
        for slot in self.slot_lru:  # least recently used first
            owner = self.slot_owner[slot]
            if owner is None:
                return slot
        for slot in self.slot_lru:
            owner = self.slot_owner[slot]
            if self.slot_pins[slot] == 0 and not owner.manifest.preload:
                owner.slot = None
                self.slot_owner[slot] = None
                self.counters.evict("device")
                self._evict_host()  # the evicted adapter's host copy may now be over the cap
                return slot
        return None

    def _free_slot(self, slot: int) -> None:
        owner = self.slot_owner[slot]
        if owner is not None:
            owner.slot = None
        self.slot_owner[slot] = None

    @torch.no_grad()
    def _write_slot(self, slot: int, weights: AdapterWeights) -> None:
        for layer, module, proj in self.projections:
            proj.lora_a[slot].zero_()
            proj.lora_b[slot].zero_()
            pair = weights.weights.get((layer, module))
            proj.slot_has_weights[slot] = pair is not None
            if pair is not None:
                a, b = pair
                proj.lora_a[slot, : a.shape[0]].copy_(a, non_blocking=True)
                proj.lora_b[slot, :, : a.shape[0]].copy_(b, non_blocking=True)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
