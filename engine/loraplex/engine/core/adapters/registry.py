"""The adapter registry: one `AdapterEntry` per name, and what the API reads about it.

An entry is either *registered* (a manifest, the admin API, --preload-adapters) or *dynamic*
(a name resolved through the default source on first use). Dynamic entries are forgotten again
once they hold nothing (no weights, no slot, no waiting request), so the registry stays bounded
by the cache tiers, not by how many names clients try. Dynamic entries are indexed by location
(`dynamic_at`, sources.location_key: the resolved folder, S3 uri, Hub repo and revision), so every
spelling of one folder (`x`, `./x`, `x/`, a symlink to it) shares one entry and one copy.

Every method here runs under the manager's lock (the caller holds it).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from loraplex.engine.core.adapters.checkpoint import AdapterWeights
from loraplex.manifest import AdapterManifest, AdapterState, manifest_digest, split_revision

# A dynamic entry is kept this long after its name was last resolved, even holding nothing: its
# request is on its way from the HTTP layer to the step loop (which marks it wanted).
RESOLVED_GRACE_SECONDS = 10.0


@dataclass
class AdapterEntry:
    manifest: AdapterManifest
    generation: int  # bumped when the manifest's content changes: stale loads are dropped
    dynamic: bool = False  # resolved by name from the default source, not registered
    source_name: str | None = None  # the name a request used, for a dynamic entry
    merged: bool = False  # a per-request merge (merge.py): weights made in RAM, nothing to fetch
    weights: AdapterWeights | None = None  # the host-RAM copy
    rank: int = 0  # known once loaded; kept while the weights live only in a device slot
    target_modules: tuple[str, ...] = ()
    nbytes: int = 0
    digest: str = ""  # content hash (AdapterWeights.digest): the prefix cache's adapter identity
    slot: int | None = None
    loading: bool = False
    message: str | None = None  # why the last load failed
    removed: bool = False  # unregistered while pinned: its slot frees when the last user leaves
    # Requests (ids) that were added for this adapter and have not got its slot yet. They pin the
    # host copy; each leaves the set when it is admitted, finishes or is aborted.
    waiters: set[str] = field(default_factory=set)
    load_seconds: float | None = None
    resolved_at: float = 0.0  # time.monotonic() of the last resolution of a dynamic name
    catalog_checked_at: float | None = None  # a dynamic entry from the operator's catalog: when fetched
    location: tuple | None = None  # where its files are (sources.location_key): the manager's `locations` key
    # for a registered entry, the registry's `dynamic_at` key for a dynamic one
    warming: bool = False  # listed by a warm start still in progress: its host copy is pinned (warming.py)
    used_at: float = 0.0  # time.monotonic() it was last given a slot or loaded: the residency metric's recency
    _digest_of: AdapterManifest | None = field(default=None, repr=False)
    _manifest_digest: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def public_name(self) -> str:
        """The name requests use: a dynamic entry's requested name; a revision's adapter name
        (`x` for `x@2`): what router and residency metrics show."""
        return split_revision(self.source_name or self.name)[0]

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

    @property
    def idle(self) -> bool:
        """Holds nothing and nobody waits for it: a dynamic entry in this state can be forgotten."""
        return self.weights is None and self.slot is None and not self.loading and not self.waiters

    @property
    def manifest_digest(self) -> str:
        """loraplex.manifest.manifest_digest of the current manifest (computed once per manifest)."""
        if self._digest_of is not self.manifest:
            self._digest_of, self._manifest_digest = self.manifest, manifest_digest(self.manifest)
        return self._manifest_digest

    def describe(self) -> dict:
        loaded = self.weights is not None or self.slot is not None
        return {
            "name": self.name, "state": self.state.value, "message": self.message,
            "rank": self.rank if loaded else None,
            "target_modules": list(self.target_modules) if loaded else None,
            "bytes": self.nbytes if loaded else None, "dynamic": self.dynamic,
            "load_seconds": self.load_seconds, "manifest": self.manifest.model_dump(exclude_none=True),
            "manifest_digest": self.manifest_digest,
        }

    def summary(self) -> dict:
        """The compact listing's row: enough for the operator to diff a pod against its placed
        set (the manifest is compared by its digest)."""
        return {"name": self.name, "state": self.state.value, "message": self.message, "dynamic": self.dynamic,
                "manifest_digest": self.manifest_digest}


class Registry:
    """Name -> entry, plus LRU order over the dynamic entries (to forget idle ones first)."""

    def __init__(self, max_dynamic: int):
        self.entries: dict[str, AdapterEntry] = {}
        self.dynamic_lru: OrderedDict[str, None] = OrderedDict()
        self.dynamic_at: dict[tuple, str] = {}  # location -> the dynamic entry serving those files
        self.max_dynamic = max_dynamic
        self._generation = 0

    def get(self, name: str) -> AdapterEntry | None:
        return self.entries.get(name)

    def add(self, manifest: AdapterManifest, dynamic: bool = False, location: tuple | None = None) -> AdapterEntry:
        """A new entry under manifest.name (replacing any there). A dynamic one is indexed by
        `location`, the key of the files it serves."""
        self._generation += 1
        old = self.entries.get(manifest.name)
        if old is not None:
            self._unindex(old)
        entry = AdapterEntry(manifest=manifest, generation=self._generation, dynamic=dynamic)
        self.entries[manifest.name] = entry
        self.dynamic_lru.pop(manifest.name, None)
        if dynamic:
            entry.resolved_at = time.monotonic()
            self._trim_dynamic()
            self.dynamic_lru[manifest.name] = None
            if location is not None:
                entry.location = location
                self.dynamic_at[location] = manifest.name
        return entry

    def dynamic_serving(self, location: tuple) -> AdapterEntry | None:
        """The dynamic entry that serves the files at `location`, if one does."""
        name = self.dynamic_at.get(location)
        entry = self.entries.get(name) if name is not None else None
        return entry if entry is not None and entry.dynamic and not entry.removed else None

    def _unindex(self, entry: AdapterEntry) -> None:
        if entry.location is not None and self.dynamic_at.get(entry.location) == entry.name:
            del self.dynamic_at[entry.location]

    def adopt(self, entry: AdapterEntry) -> None:
        """A dynamic entry becomes a registered one (the same files were registered under its
        name): kept as it is, weights and slot included, and no longer forgotten when idle."""
        self._unindex(entry)
        entry.dynamic = False
        entry.source_name = None
        entry.catalog_checked_at = None
        self.dynamic_lru.pop(entry.name, None)

    def pop(self, name: str) -> AdapterEntry | None:
        self.dynamic_lru.pop(name, None)
        entry = self.entries.pop(name, None)
        if entry is not None:
            self._unindex(entry)
        return entry

    def touch(self, entry: AdapterEntry) -> None:
        if entry.dynamic and entry.name in self.dynamic_lru:
            self.dynamic_lru.move_to_end(entry.name)

    def forget_if_idle(self, entry: AdapterEntry) -> bool:
        """Drop a dynamic entry that holds nothing and was not just resolved; True if dropped."""
        if (entry.dynamic and entry.idle and self.entries.get(entry.name) is entry
                and time.monotonic() - entry.resolved_at >= RESOLVED_GRACE_SECONDS):
            self.pop(entry.name)
            return True
        return False

    def _trim_dynamic(self) -> None:
        """Resolved names whose requests never came (a client gave up in between) hold nothing but
        a registry row; past the cap, the least recently used idle ones go (once their grace
        period is over: the cap may be exceeded by the names resolved in the last 10 s)."""
        excess = len(self.dynamic_lru) - self.max_dynamic
        for name in list(self.dynamic_lru):
            if excess <= 0:
                break
            if self.forget_if_idle(self.entries[name]):
                excess -= 1

    def sweep(self) -> list[AdapterEntry]:
        """Forget every dynamic entry that holds nothing and whose grace period is over."""
        gone = []
        for name in list(self.dynamic_lru):
            entry = self.entries[name]
            if self.forget_if_idle(entry):
                gone.append(entry)
        return gone

    def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in AdapterState}
        for e in self.entries.values():
            counts[e.state.value] += 1
        return counts

    def __iter__(self):
        return iter(list(self.entries.values()))

    def __len__(self) -> int:
        return len(self.entries)
