"""Keep the adapter registry in step with `--adapter-manifest-file`.

The file (`{"adapters": [...]}` or a bare list, see loraplex.manifest) is polled about once a
second; on a content change it is reconciled: adapters in the file are registered (idempotent),
adapters that left the file are unregistered. Only adapters this watcher registered are ever
unregistered by it (adapters added through the API stay). A file that cannot be read or
parsed is logged once and the last good set is kept.

Kubernetes updates a mounted ConfigMap by swapping a symlink; reading the content each poll
(the file is small) sees that, where an mtime check on the link might not.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from loraplex.engine.core.errors import RequestError
from loraplex.manifest import AdapterManifest, parse_manifest_list

log = logging.getLogger("loraplex.engine.api.manifest")


class ManifestWatcher:
    def __init__(self, path: str | Path, adapters, interval: float = 1.0):
        self.path = Path(path)
        self.adapters = adapters  # AdapterManager
        self.interval = interval
        self.names: set[str] = set()  # what the file registered, as of the last good version
        self._digest: str | None = None
        self.last_error: str | None = None
        self.generation = 0  # good versions applied

    def poll(self) -> bool:
        """Reconcile if the file changed. True when a new good version was applied."""
        try:
            text = self.path.read_text()
        except OSError as exc:
            return self._bad("missing", f"cannot read {self.path}: {exc}")
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._digest:
            return False
        try:
            manifests = parse_manifest_list(text)
        except ValueError as exc:  # JSON and pydantic errors are ValueErrors
            return self._bad(digest, f"{self.path} is not a valid manifest list, keeping the last good set: {exc}")
        self._digest, self.last_error = digest, None
        self.apply(manifests)
        return True

    def _bad(self, digest: str, message: str) -> bool:
        if digest != self._digest:
            log.error(message)
            self._digest, self.last_error = digest, message
        return False

    def apply(self, manifests: list[AdapterManifest]) -> None:
        wanted = {m.name: m for m in manifests}
        for name in sorted(self.names - wanted.keys()):
            if self.adapters.unregister(name):
                log.info("adapter %s left %s: unregistered", name, self.path.name)
        registered = set()
        for m in manifests:
            try:
                self.adapters.register(m)
                registered.add(m.name)
            except RequestError as exc:
                log.error("adapter %s from %s was not registered: %s", m.name, self.path, exc)
        added = registered - self.names
        if added:
            log.info("adapters registered from %s: %s", self.path.name, ", ".join(sorted(added)))
        self.names = registered
        self.generation += 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.poll)
            except Exception:  # never let the watcher die
                log.exception("manifest watcher error")
