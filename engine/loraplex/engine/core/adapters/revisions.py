"""Adapter revisions in one engine (issue 23; docs/api.md "Adapter revisions").

A manifest with `revisions` (loraplex.manifest) names the weights served under one adapter name
and each one's share of its requests. Each revision is an adapter of its own in the registry,
under its key `<name>@<number>` (manifest.revision_key), registered through the single-adapter
path: so two revisions never share weights, a device slot, prefix cache blocks (those are keyed
by the weights' content digest) or a metric series. What the name stands for is a `RevisionSet`:
a frozen snapshot, swapped whole on each registration, that a request reads once and chooses
from without the lock.

A mixin of `AdapterManager` (manager.py): it uses the manager's lock, registry, preloads and
load queue, and `_register_one`/`_drop` (manager.py), `_dynamic_entry` (dynamic_names.py).

- Re-registering a name with another set: revisions no longer listed are unregistered the usual
  way (a running request keeps its weights and slot until it finishes), unchanged ones are left
  alone (no reload), added ones are registered, and, when the name was registered already, start
  loading into host RAM at once (the load pool), so that the first request shifted to them is
  warm ("warm before shift").
- A dropped revision retires: no new request can pick or pin it, but its registry entry, and so
  its weights, stay for the requests that hold it (running, or preempted and waiting to run
  again) and for RETIRE_GRACE_SECONDS, so that a request that chose it just before the change and
  has not reached the step loop yet finds it too; the sweep forgets it after that, once nothing
  holds it. Requests in flight finish on the weights they started with (no drain).
- A name goes from plain to revisioned and back; a plain adapter whose files become one of its
  revisions hands that revision its weights and device slot (no reload); unregistering it removes every revision.
- A catalog answer (catalog_source.py) with revisions makes a dynamic set: its revisions are
  dynamic entries, forgotten when idle like any other and made again when a request picks them.
"""
from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass

from loraplex.engine.core.adapters.dynamic_names import content
from loraplex.engine.core.errors import RequestError
from loraplex.manifest import AdapterManifest, AdapterState, manifest_digest, split_revision

# How long a dropped revision stays for the requests that chose it before the change and are still
# on their way to the step loop (tokenizing, waiting on a quota or the prepare pool).
RETIRE_GRACE_SECONDS = 10.0
BUCKETS = 10_000  # a session's place in the split: one bucket per 0.01 %
# Least ready first: a name is as ready as its least ready revision that takes traffic.
READINESS = (AdapterState.FAILED, AdapterState.REGISTERED, AdapterState.LOADING, AdapterState.HOST,
             AdapterState.DEVICE)


@dataclass(frozen=True)
class Revision:
    number: int
    percent: int
    key: str  # the registry key, `<name>@<number>`
    digest: str  # manifest_digest of the revision's own (single-weights) manifest


@dataclass(frozen=True)
class RevisionSet:
    """The revisions served under one name, newest first."""

    manifest: AdapterManifest  # the whole manifest as pushed
    digest: str  # manifest_digest(manifest): what the operator compares
    revisions: tuple[Revision, ...]
    dynamic: bool = False  # from the operator's catalog, not registered here
    checked_at: float = 0.0  # dynamic: when the catalog last answered it (time.monotonic())

    @classmethod
    def of(cls, manifest: AdapterManifest, dynamic: bool = False) -> "RevisionSet":
        revs = tuple(Revision(r.number, r.percent, m.name, manifest_digest(m))
                     for r, m in reversed(manifest.revision_manifests()))
        return cls(manifest, manifest_digest(manifest), revs, dynamic, time.monotonic())

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.revisions]

    def get(self, number: int) -> Revision | None:
        return next((r for r in self.revisions if r.number == number), None)

    def choose(self, session: str | None = None, rng: random.Random | None = None) -> Revision:
        """The revision for one request. With a session, its bucket (a hash of name and session,
        0..9999) falls in the range of one revision: newest first, each owning percent x 100
        consecutive buckets, so a session stays on a canary as the canary's percent grows.
        Without one, a weighted random draw over the same ranges. 0 % revisions own nothing."""
        if session is not None:
            bucket = int(hashlib.sha256(f"{self.name}\0{session}".encode()).hexdigest()[:8], 16) % BUCKETS
        else:
            bucket = (rng or random).randrange(BUCKETS)
        for r in self.revisions:
            if bucket < r.percent * 100:
                return r
            bucket -= r.percent * 100
        raise AssertionError("the percents of a revision set sum to 100")  # the manifest validates it

    def serving_keys(self) -> list[str]:
        """The keys of the revisions that take traffic (percent > 0), newest first."""
        return [r.key for r in self.revisions if r.percent > 0]


class Revisions:
    def revision_set(self, name: str) -> RevisionSet | None:
        """The revisions served under `name`; None when it has none (a plain adapter, unknown, or
        a catalog answer due for a new check)."""
        with self.lock:
            return self._revision_set(name)

    def _revision_set(self, name: str) -> RevisionSet | None:
        revisions = self.revisions.get(name)
        if revisions is None or not revisions.dynamic:
            return revisions
        if time.monotonic() - revisions.checked_at >= self.config.adapter_catalog_ttl_seconds:
            return None  # the request resolves the name again, through the catalog
        for _, m in revisions.manifest.revision_manifests():  # idle revisions were forgotten: made again
            entry = self.registry.get(m.name)
            if entry is None or entry.removed:
                self._dynamic_entry(m.name, m, None, load=False)
        return revisions

    def _register_revisions(self, manifest: AdapterManifest, dynamic: bool = False) -> dict:
        name = manifest.name
        with self.lock:
            old = self.revisions.get(name)
            plain = self.registry.get(name)
            pairs = manifest.revision_manifests()
            keys = [m.name for _, m in pairs]
            if manifest.preload and not dynamic:
                others = self.preloads - {name, *keys, *(old.keys if old else ())}
                if len(others) + len(keys) >= self.num_slots:
                    raise RequestError(
                        f"cannot preload the {len(keys)} revisions of {name!r}: {len(others)} of {self.num_slots} "
                        "device slots are held by other preloaded adapters and one must stay free for on-demand "
                        "adapters; raise --max-active-adapters", param="preload")
            # Warm before shift: on a name served here already, new revisions load at once.
            warm = old is not None or (plain is not None and not plain.removed)
            if plain is not None:
                self.registry.pop(name)
            carried = plain if plain is not None and not plain.removed and not plain.merged else None
            for key in set(old.keys if old else ()) - set(keys):
                self._unregister_entry(key)
            for r, m in pairs:
                self.retiring.pop(m.name, None)  # listed again: serves again
                known = self.registry.get(m.name)
                added = known is None or known.removed
                if dynamic:
                    self._dynamic_entry(m.name, m, None, load=r.percent > 0)
                    continue
                if added and carried is not None and content(carried.manifest) == content(m):
                    self._carry_over(carried, m)
                    carried, added = None, False
                self._register_one(m)
                if warm and added:
                    self.request_load(m.name)
            if plain is not None:
                self._drop(plain)
            self.revisions[name] = RevisionSet.of(manifest, dynamic)
            return self._revision_row(self.revisions[name], compact=False)

    def _carry_over(self, plain, manifest: AdapterManifest) -> None:
        """A plain adapter becomes a revision of the same files (a LoraAdapter from before
        revisions becomes revision 1): the revision's entry takes over its weights and device
        slot, pins included, so nothing loads again and the requests running on it keep their
        slot."""
        entry = self.registry.add(manifest)
        entry.rank, entry.target_modules, entry.nbytes, entry.digest = (plain.rank, plain.target_modules,
                                                                        plain.nbytes, plain.digest)
        entry.load_seconds, entry.used_at = plain.load_seconds, plain.used_at
        if plain.weights is not None:
            entry.weights = plain.weights
            self.host.drop(plain)
            self.host.add(entry)
        if plain.slot is not None:
            slot, plain.slot = plain.slot, None
            self.slots.assign(slot, entry)

    def _unregister_revisions(self, name: str) -> None:
        revisions = self.revisions.pop(name, None)
        for key in revisions.keys if revisions else ():
            self._unregister_entry(key)

    def _unregister_entry(self, key: str) -> None:
        """Retire a revision: the sweep forgets it after the grace period, once nothing holds it."""
        if key in self.registry.entries:
            self.retiring.setdefault(key, time.monotonic() + RETIRE_GRACE_SECONDS)

    def _forget_entry(self, key: str) -> None:
        entry = self.registry.pop(key)
        if entry is not None:
            self._drop(entry)

    def _held(self, entry) -> bool:
        return bool(entry.waiters) or (entry.slot is not None and self.slots.pins[entry.slot] > 0)

    def _sweep_revisions(self) -> None:
        """Forget retired revisions nothing holds any more, and dynamic sets none of whose
        revisions is held (with the registry's sweep)."""
        now = time.monotonic()
        for key, deadline in list(self.retiring.items()):
            entry = self.registry.get(key)
            if entry is None or (now >= deadline and not self._held(entry)):
                del self.retiring[key]
                self._forget_entry(key)
        for name, revisions in list(self.revisions.items()):
            if revisions.dynamic and all(self.registry.get(k) is None for k in revisions.keys):
                del self.revisions[name]

    def _warm_keys(self, names: list[str]) -> list[str]:
        """A warm start's names as registry keys: a revisioned name's revisions that take traffic,
        newest first; other names as they are."""
        out = []
        for name in names:
            revisions = self.revisions.get(name)
            out += revisions.serving_keys() if revisions is not None else [name]
        return out

    def _revision_row(self, revisions: RevisionSet, compact: bool) -> dict:
        """The listing's one row for a revisioned name: its aggregate state (the least ready of
        the revisions taking traffic) and one row per revision, newest first."""
        rows, worst = [], None
        for r in revisions.revisions:
            entry = self.registry.get(r.key)
            state = entry.state if entry is not None else AdapterState.REGISTERED
            message = entry.message if entry is not None else None
            row = entry.describe() if entry is not None and not compact else {}
            rows.append({**row, "number": r.number, "percent": r.percent, "state": state.value, "message": message,
                         "manifest_digest": r.digest})
            if r.percent > 0 and (worst is None or READINESS.index(state) < READINESS.index(worst[0])):
                worst = (state, message and f"revision {r.number}: {message}")
        state, message = worst or (AdapterState.REGISTERED, None)
        row = {"name": revisions.name, "state": state.value, "message": message, "dynamic": revisions.dynamic,
               "manifest_digest": revisions.digest}
        if not compact:
            row.update(rank=None, target_modules=None, bytes=None, load_seconds=None,
                       manifest=revisions.manifest.model_dump(exclude_none=True))
        row["revisions"] = rows
        return row


def is_revision_key(name: str) -> bool:
    """Whether a registry name is a revision's key (adapter names never hold '@')."""
    return split_revision(name)[1] is not None
