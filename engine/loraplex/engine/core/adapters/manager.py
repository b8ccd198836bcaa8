"""The adapter manager: the registry and its tiers behind one lock.

- registry.py: names -> entries (registered, or dynamic: resolved by name on first use)
- dynamic_names.py (a mixin): unregistered names, just in time, through resolver.py and
  sources.DefaultSource (on an operator-managed engine catalog_source.CatalogSource), one entry
  per location, never around a registered adapter's tenants
- device_gate.py (a mixin): the scheduler's gate: device slots, pins, what waits
- loader.py: fetch (disk tier) + parse, on a thread pool, never on the step loop
- host_tier.py: parsed weights in RAM, bounded in bytes, LRU
- device_slots.py: the model's slot buffers, LRU, pinned by running sequences
- disk_tier.py: Hub/S3 downloads, bounded in bytes, LRU
- merged_cache.py: merged adapters (merge.py), RAM only, their own budget beside the host tier
- warming.py (a mixin): a warm start's loads, hottest first, and the tiers' residency for routers
- revisions.py (a mixin): a name served as several revisions (`<name>@<n>` entries) split by percent

Loads a request waits for start in request order (oldest first), ahead of every prefetch (a
preload, a warm start, a revision warmed before traffic shifts to it: `prefetch=True`), so a wave
of prefetches never queues a request behind it; at most --adapter-load-workers at a time, and only
when the host tier has room for one more adapter after evicting unpinned copies; so host RAM
stays within its budget while thousands of adapters cycle through. Copies into a device slot run
on the step thread (inside `acquire`/`on_step`), so they never race a forward pass.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.engine.core.adapters.catalog_source import CatalogSource
from loraplex.engine.core.adapters.checkpoint import AdapterFormatError, AdapterWeights
from loraplex.engine.core.adapters.device_gate import DeviceGate
from loraplex.engine.core.adapters.device_slots import DeviceSlots
from loraplex.engine.core.adapters.disk_tier import DiskTier
from loraplex.engine.core.adapters.dynamic_names import DynamicNames, content
from loraplex.engine.core.adapters.host_tier import HostTier
from loraplex.engine.core.adapters.loader import AdapterLoader
from loraplex.engine.core.adapters.merged_cache import MergedCache
from loraplex.engine.core.adapters.registry import AdapterEntry, Registry
from loraplex.engine.core.adapters.resolver import NameResolver, NegativeCache
from loraplex.engine.core.adapters.revisions import RevisionSet, Revisions, is_revision_key
from loraplex.engine.core.adapters.sources import AdapterSourceError, DefaultSource, location_key
from loraplex.engine.core.adapters.warming import Warming
from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.errors import AdapterUnavailableError, InvalidAdapterError, RequestError, UnknownAdapterError
from loraplex.engine.model.config import ModelConfig
from loraplex.manifest import AdapterManifest, AdapterState

log = logging.getLogger("loraplex.adapters")


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


class AdapterManager(DynamicNames, DeviceGate, Warming, Revisions):
    def __init__(self, config: EngineConfig, model, model_config: ModelConfig, slots_factory=DeviceSlots):
        self.config = config
        self.model_config = model_config
        self.dtype = next(model.parameters()).dtype
        projections = list(model.lora_projections())
        self.num_slots = projections[0][2].lora_a.shape[0] if projections else config.max_active_adapters
        self.adapter_dir = Path(config.adapter_dir) if config.adapter_dir else None
        self.cache_dir = Path(config.adapter_cache_dir) if config.adapter_cache_dir else None
        self.lock = threading.RLock()
        self.registry = Registry(max_dynamic=config.max_dynamic_adapters)
        self.host = HostTier(config.adapter_host_bytes, config.max_cpu_adapters)
        self.slots = slots_factory(projections, self.num_slots)  # tensor parallel: tp_runner.ShardedDeviceSlots
        self.disk = DiskTier(self.cache_dir, config.adapter_disk_bytes)
        self.loader = AdapterLoader(config, model_config, self.dtype, self.adapter_dir, self.cache_dir, self.disk)
        self.counters = AdapterCounters()
        self.pool = ThreadPoolExecutor(max_workers=config.adapter_load_workers, thread_name_prefix="adapter-load")
        self.load_queue: OrderedDict[str, None] = OrderedDict()  # names requests wait for, in request order
        self.prefetch_queue: OrderedDict[str, None] = OrderedDict()  # names to load ahead of requests, after those
        self.num_loading = 0
        self.mean_bytes = 0  # running mean adapter size: what the next load will likely need
        self.pending_placement: set[str] = set()  # preloads waiting for the step thread
        self.warming: list[str] = []  # a warm start's adapters, hottest first, while it lasts (warming.py)
        self.locations: dict[tuple, str] = {}  # where a registered adapter's files are -> its name
        self.preloads: set[str] = set()  # names registered with preload: true (each holds a device slot)
        self.aliases: OrderedDict[str, str] = OrderedDict()  # requested name -> registry name
        self.revisions: dict[str, RevisionSet] = {}  # revisioned name -> its revisions (revisions.py)
        self.retiring: dict[str, float] = {}  # dropped revision key -> end of its grace period (revisions.py)
        self.source = DefaultSource(config.adapter_source, self.adapter_dir, self.cache_dir, config.adapter_s3_prefix)
        # With a catalog, names unknown there are unknown here: the default source is not asked
        # (it would serve them without the LoraAdapter's tenants, sha256 and own source).
        self.catalog = (CatalogSource(config.adapter_catalog_url, config.adapter_catalog_token_file)
                        if config.adapter_catalog_url else None)
        usable = self.catalog is not None or self.source.usable
        self.dynamic = config.dynamic_adapter_policy() if usable else "off"
        locate = self.catalog.locate if self.catalog is not None else self.source.locate
        self.resolver = NameResolver(locate, self._register_dynamic, config.max_concurrent_adapter_loads,
                                     NegativeCache(config.adapter_negative_cache_seconds,
                                                   config.adapter_negative_cache_size))
        self.merged = MergedCache(config.adapter_merged_bytes, config.max_concurrent_merges)
        self.last_sweep = 0.0

    # ---- registry (any thread) ------------------------------------------------------------

    def register(self, manifest: AdapterManifest) -> dict:
        """Add or update an adapter. Idempotent: the same manifest again changes nothing,
        except that a failed adapter is retried. Nothing here grows with the number of adapters
        registered, and nothing is loaded unless the manifest asks for a preload (the load then
        runs on the pool: the call never waits for weights). A manifest with revisions registers
        each revision (revisions.py)."""
        if manifest.revisions is not None:
            return self._register_revisions(manifest)
        with self.lock:
            self._unregister_revisions(manifest.name)  # revisioned before: plain from now on
            return self._register_one(manifest)

    def _register_one(self, manifest: AdapterManifest) -> dict:
        key = location_key(manifest, self.adapter_dir)
        with self.lock:
            entry = self.registry.get(manifest.name)
            if manifest.preload and (entry is None or not entry.manifest.preload):
                pinned = len(self.preloads)
                if pinned + 1 >= self.num_slots:
                    raise RequestError(
                        f"cannot preload {manifest.name!r}: {pinned} of {self.num_slots} device slots are held by "
                        "preloaded adapters and one must stay free for on-demand adapters; raise --max-active-adapters",
                        param="preload")
            self._repoint_dynamic(key, manifest.name)  # these files are this adapter's (and its tenants') now
            if entry is not None and entry.dynamic and not entry.removed \
                    and content(entry.manifest) == content(manifest):
                # Loaded just in time (the catalog), now registered here (placed): keep its weights.
                self.registry.adopt(entry)
            if entry is None or entry.removed or entry.dynamic or content(entry.manifest) != content(manifest):
                if entry is not None:
                    self._drop(entry)
                entry = self.registry.add(manifest)
            else:
                entry.manifest = manifest  # tenants or preload changed: no reload needed
                if entry.state == AdapterState.FAILED:
                    entry.message = None
            self.locations[key] = manifest.name
            entry.location = key
            if manifest.preload:
                self.preloads.add(manifest.name)
                self._enqueue(entry, prefetch=True)
                if entry.weights is not None and entry.slot is None:
                    self.pending_placement.add(manifest.name)
            else:
                self.preloads.discard(manifest.name)
            return entry.describe()

    def unregister(self, name: str) -> bool:
        """Remove an adapter (every revision of a revisioned one). A revision alone is never
        removed here: the manifest says which revisions are served."""
        with self.lock:
            if name in self.revisions:
                self._unregister_revisions(name)
                return True
            if is_revision_key(name):
                return False
            entry = self.registry.pop(name)
            if entry is None:
                return False
            self._drop(entry)
            return True

    def register_merged(self, name: str, weights: AdapterWeights, tenants: list[str]) -> None:
        """Add a merged adapter (merge.py) whose weights are given. It stays in RAM, in the merged
        cache (merged_cache.py: its own budget, outside the host tier), until newer merges push it
        out; then it is unregistered (its slot frees when its last running request ends) and made
        again on need. Raises MergeCapacityError (429) when the merges in use leave no room."""
        with self.lock:
            entry = self.registry.get(name)
            if entry is not None:
                self.merged.touch(entry)
                return
            for victim in self.merged.make_room(weights.nbytes):
                self.unregister(victim.name)
            manifest = AdapterManifest(name=name, source="local", uri=f"merged/{name}", tenants=tenants)
            entry = self.registry.add(manifest)
            entry.merged = True
            self._set_weights(entry, weights)
            self.merged.add(entry)

    def use_merged(self, name: str) -> bool:
        """True when the merge `name` is made already (it is marked used: kept a while for the request)."""
        with self.lock:
            entry = self.registry.get(name)
            if entry is None or not entry.merged or entry.weights is None:
                return False
            self.merged.touch(entry)
            return True

    def host_weights(self, name: str) -> AdapterWeights | None:
        """The adapter's weights if RAM holds them (merges read their sources through this)."""
        with self.lock:
            entry = self.registry.get(name)
            return entry.weights if entry is not None else None

    def _drop(self, entry: AdapterEntry) -> None:
        """Forget an entry's weights; its slot frees now, or when its last running user leaves."""
        entry.removed = True
        self.merged.drop(entry)
        self.host.drop(entry)
        self.pending_placement.discard(entry.name)
        self.load_queue.pop(entry.name, None)
        self.prefetch_queue.pop(entry.name, None)
        self.preloads.discard(entry.name)  # register() adds it back when the new manifest preloads
        if entry.location is not None and self.locations.get(entry.location) == entry.name:
            del self.locations[entry.location]
        if entry.slot is not None and self.slots.pins[entry.slot] == 0:
            self.slots.free(entry.slot)

    def get(self, name: str) -> dict | None:
        with self.lock:
            if name in self.revisions:
                return self._revision_row(self.revisions[name], compact=False)
            entry = self.registry.get(name)
            return entry.describe() if entry else None

    def list(self, compact: bool = False) -> list[dict]:
        """Every adapter, by name: `describe()`, or `summary()` when compact; a revisioned name
        is one row with its revisions inside (never a row per `<name>@<n>`)."""
        with self.lock:
            rows = {n: e.summary() if compact else e.describe() for n, e in self.registry.entries.items()
                    if not is_revision_key(n)}
            rows.update((n, self._revision_row(r, compact)) for n, r in self.revisions.items())
            return [rows[n] for n in sorted(rows)]

    def check_servable(self, name: str) -> None:
        with self.lock:
            entry = self.registry.get(name)
            if entry is None:
                raise UnknownAdapterError(f"the model {name!r} does not exist", param="model")
            if entry.state == AdapterState.FAILED:
                raise AdapterUnavailableError(f"adapter {name!r} failed to load: {entry.message}", param="model")

    def failure(self, name: str) -> str | None:
        """Why requests for `name` cannot run (None: they can, now or once loaded)."""
        with self.lock:
            entry = self.registry.get(name)
            if entry is None:
                return "the adapter was unregistered"
            return entry.message if entry.state == AdapterState.FAILED else None

    def preload_ready(self) -> tuple[bool, list[str]]:
        """(all preloaded adapters on the device, the names still missing)."""
        with self.lock:
            missing = [n for n in self.preloads if self.registry.get(n) is None
                       or self.registry.get(n).state != AdapterState.DEVICE]
            return not missing, sorted(missing)

    def tier_counts(self) -> dict[str, int]:
        with self.lock:
            return self.registry.counts()

    def tier_bytes(self) -> dict[str, tuple[int, int | None]]:
        """tier -> (bytes used, budget in bytes or None)."""
        from loraplex.engine.core.adapters.device_slots import slot_bytes

        per_slot = slot_bytes(self.model_config, self.config.max_lora_rank, self.dtype)
        with self.lock:
            used_slots = sum(1 for o in self.slots.owner if o is not None)
            host = (self.host.bytes, self.host.budget_bytes)
            merged = (self.merged.bytes, self.merged.budget_bytes)
        with self.disk.lock:
            disk = (self.disk.bytes, self.disk.budget_bytes)
        return {"device": (used_slots * per_slot, self.num_slots * per_slot), "host": host, "merged": merged,
                "disk": disk}

    # ---- loading (thread pool) ------------------------------------------------------------

    def want(self, seq) -> None:
        """seq waits for its adapter: pin the host copy for it and load it (in arrival order)."""
        with self.lock:
            entry = self.registry.get(seq.adapter)
            if entry is not None:
                entry.waiters.add(seq.request_id)
                self._enqueue(entry)

    def request_load(self, name: str) -> None:
        """Load an adapter ahead of its requests (after every load a request waits for)."""
        with self.lock:
            entry = self.registry.get(name)
            if entry is not None:
                self._enqueue(entry, prefetch=True)

    def _enqueue(self, entry: AdapterEntry, prefetch: bool = False) -> None:
        if entry.weights is None and entry.slot is None and not entry.loading and entry.message is None:
            if not prefetch:
                self.prefetch_queue.pop(entry.name, None)  # a request waits for it now
                self.load_queue[entry.name] = None
            elif entry.name not in self.load_queue:
                self.prefetch_queue[entry.name] = None
        self._pump()

    def _pump(self) -> None:
        """Start queued loads, oldest first, while a loader is free and the host tier has room for
        one more adapter. When it has none, loads wait for staged copies to reach a slot, except
        when nothing is staged (then one load always goes, so the engine never stalls)."""
        while (queue := self.load_queue or self.prefetch_queue) and \
                self.num_loading < self.config.adapter_load_workers:
            name = next(iter(queue))
            entry = self.registry.get(name)
            if entry is None or entry.removed or entry.weights is not None or entry.slot is not None \
                    or entry.loading or entry.message is not None:
                del queue[name]
                continue
            self._evict_host(self.mean_bytes)
            if self.host.over(self.mean_bytes) and (self.host.staged() or self.num_loading):
                return
            del queue[name]
            entry.loading = True
            self.num_loading += 1
            self.pool.submit(self._load, entry)

    def _load(self, entry: AdapterEntry) -> None:
        t0 = time.perf_counter()
        tier = "disk" if entry.manifest.source == "local" else entry.manifest.source
        weights, message = None, None
        try:
            weights = self.loader.load(entry.manifest)
        except (AdapterFormatError, AdapterSourceError) as exc:
            message = str(exc)
        except Exception as exc:  # anything else is still this adapter's failure, not the engine's
            log.exception("loading adapter %s failed", entry.name)
            message = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        with self.lock:
            entry.loading = False
            self.num_loading -= 1
            if entry.removed or self.registry.get(entry.name) is not entry:
                self._pump()
                return
            self.counters.load(tier, "error" if message else "ok")
            if message:
                entry.message = message
                log.warning("adapter %s failed to load: %s", entry.name, message)
                self._forget_if_done(entry)
                self._pump()
                return
            self._set_weights(entry, weights)
            entry.load_seconds = seconds
            entry.used_at = time.monotonic()
            self.mean_bytes = weights.nbytes if not self.mean_bytes else (7 * self.mean_bytes + weights.nbytes) // 8
            self.counters.load_seconds.append(seconds)
            self.host.add(entry)
            self._evict_host()
            if entry.manifest.preload:
                self.pending_placement.add(entry.name)
            self._pump()

    @staticmethod
    def _set_weights(entry: AdapterEntry, weights: AdapterWeights) -> None:
        entry.weights, entry.rank, entry.target_modules = weights, weights.rank, weights.target_modules
        entry.nbytes, entry.digest = weights.nbytes, weights.digest

    def _evict_host(self, extra_bytes: int = 0) -> None:
        for dropped in self.host.evict(extra_bytes):
            self.counters.evict("host")
            self._forget_if_done(dropped)

    def _forget_if_done(self, entry: AdapterEntry) -> None:
        """A dynamic entry that holds nothing is forgotten (the registry stays bounded); one whose
        load failed is remembered as bad in the negative cache for a while."""
        if entry.dynamic and entry.idle and self.registry.forget_if_idle(entry):
            self._remember_failure(entry)

    def _remember_failure(self, entry: AdapterEntry) -> None:
        if entry.message is not None and entry.source_name:
            self.resolver.forget(entry.source_name, InvalidAdapterError(
                f"{entry.source_name!r} is not a servable LoRA adapter: {entry.message}", param="model"))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.resolver.shutdown()
        if self.catalog is not None:
            self.catalog.close()
