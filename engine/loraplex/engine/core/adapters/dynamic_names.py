"""Names nobody registered, served just in time (docs/api.md "Adapters by name"), and the rule that
keeps them from serving a registered adapter's files around its tenant check.

A mixin of `AdapterManager` (manager.py): it uses the manager's lock, registry, `locations` (where
registered adapters' files are), resolver and catalog. The rules, all keyed by the files' location
(sources.location_key: the folder after resolving symlinks, `.` and trailing slashes; the S3 uri;
the Hub repo and revision):

- A name that resolves to files a registered adapter serves is served as that adapter (and its
  tenants), never as a dynamic entry of its own.
- One dynamic entry per location: every spelling of a folder (`x`, `./x`, `x/`, a symlink to it)
  maps to the first entry made for it (one copy in the cache, one device slot).
- A registration over files that a dynamic entry serves takes its place: the dynamic entry is
  dropped and its names map to the registered adapter from then on (`_repoint_dynamic`).

With the operator's catalog, each manifest is a LoraAdapter with its own tenants: those entries
are neither merged with each other by location nor served as another registered adapter.
"""
from __future__ import annotations

import time
from concurrent.futures import Future

from loraplex.engine.core.adapters.registry import AdapterEntry
from loraplex.engine.core.adapters.sources import location_key
from loraplex.engine.core.errors import UnknownAdapterError
from loraplex.manifest import AdapterManifest


def done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def content(m: AdapterManifest) -> tuple:
    """What a manifest's weights depend on: the same content means the same weights."""
    return (m.source, m.uri, m.revision, m.sha256, m.config_sha256)


class DynamicNames:
    def resolve(self, name: str) -> Future:
        """A Future of the registry name serving `name`, resolving an unregistered name through
        the default source. Its exception is a RequestError (400, 404, 422, 424)."""
        with self.lock:
            if self._revision_set(name) is not None:
                return done(name)
            entry = self._lookup(name)
            if entry is not None and not entry.removed:
                self.registry.touch(entry)
                entry.resolved_at = time.monotonic()
                return done(entry.name)
        if self.dynamic == "off":
            f: Future = Future()
            f.set_exception(UnknownAdapterError(f"the model {name!r} does not exist", param="model"))
            return f
        return self.resolver.resolve(name)

    def manifest(self, name: str) -> AdapterManifest | None:
        """The manifest serving `name`: a registered name (the whole manifest of a revisioned
        one), or a name resolved from the default source or the catalog."""
        with self.lock:
            revisions = self._revision_set(name)
            if revisions is not None:
                return revisions.manifest
            if name in self.revisions:
                return None  # a catalog answer due for a new check
            entry = self._lookup(name)
            if entry is None:
                return None
            if entry.dynamic:  # a request is about to use it: keep it until that request is queued
                entry.resolved_at = time.monotonic()
            return entry.manifest

    def _lookup(self, name: str) -> AdapterEntry | None:
        """The entry serving `name`; None also for a catalog entry due for a new check (the
        request then resolves it again, through the catalog)."""
        entry = self.registry.get(name)
        if entry is None and name in self.aliases:
            entry = self.registry.get(self.aliases[name])
            if entry is None:
                del self.aliases[name]
        if entry is not None and entry.catalog_checked_at is not None \
                and time.monotonic() - entry.catalog_checked_at >= self.config.adapter_catalog_ttl_seconds:
            return None
        return entry

    def _register_dynamic(self, requested: str, manifest: AdapterManifest) -> str:
        if manifest.revisions is not None:  # the catalog's LoraAdapters are served by revisions
            self._register_revisions(manifest, dynamic=True)
            return manifest.name
        key = location_key(manifest, self.adapter_dir)
        with self.lock:
            self._unregister_revisions(manifest.name)  # a catalog answer with revisions before, plain now
            # A catalog manifest is a LoraAdapter of its own: never served as another adapter
            # that names the same files (that one's tenants are not this one's).
            registered = self.locations.get(key) if self.catalog is None else None
            shared = self.registry.dynamic_serving(key) if self.catalog is None else None
            if registered is not None and self.registry.get(registered) is not None:
                name = registered  # the same files are registered: serve them under that entry (and its tenants)
            elif shared is not None:
                name = shared.name  # another spelling of files a dynamic entry serves: that entry
                shared.resolved_at = time.monotonic()
                self.registry.touch(shared)
                self._enqueue(shared)
            else:
                name = self._dynamic_entry(requested, manifest, key).name
            if requested != name:
                self._alias(requested, name)
            return name

    def _dynamic_entry(self, requested: str, manifest: AdapterManifest, key: tuple | None,
                       load: bool = True) -> AdapterEntry:
        entry = self.registry.get(manifest.name)
        if entry is None or entry.removed or content(entry.manifest) != content(manifest):
            if entry is not None and not entry.dynamic:
                raise UnknownAdapterError(f"the model {requested!r} does not exist (its name is taken by "
                                          f"a registered adapter)", param="model")
            if entry is not None:
                self._drop(entry)  # other files now (a new sha256 in the catalog): never the old weights
            entry = self.registry.add(manifest, dynamic=True, location=key if self.catalog is None else None)
            entry.source_name = requested
        elif entry.dynamic:
            entry.manifest = manifest  # checked again in the catalog: its tenants may have changed
        now = time.monotonic()
        entry.resolved_at = now
        if self.catalog is not None and entry.dynamic:
            entry.catalog_checked_at = now
        if load and not manifest.tenants:
            # Start loading now: the request follows at once. A tenant-restricted adapter waits
            # for a request that passed its tenant check (`want`), so that a caller without the
            # key cannot make the pod load it.
            self._enqueue(entry)
        return entry

    def _alias(self, requested: str, name: str) -> None:
        self.aliases[requested] = name
        self.aliases.move_to_end(requested)
        while len(self.aliases) > 4 * self.registry.max_dynamic:
            self.aliases.popitem(last=False)

    def _repoint_dynamic(self, key: tuple, name: str) -> None:
        """`name` is being registered over the files at `key`: a dynamic entry serving them under
        another name is dropped (a request already running on it finishes; waiting ones end with
        an error), and its names and their aliases map to `name`, so they get its tenant check."""
        if self.catalog is not None:
            return
        entry = self.registry.dynamic_serving(key)
        if entry is None or entry.name == name:
            return  # none, or the same name: register() adopts it
        self.registry.pop(entry.name)
        self._drop(entry)
        for old in {entry.name, entry.source_name} - {None, name}:
            self._alias(old, name)
        for alias, target in list(self.aliases.items()):
            if target == entry.name:
                self.aliases[alias] = name
