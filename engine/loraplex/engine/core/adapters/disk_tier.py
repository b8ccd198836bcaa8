"""The disk tier for downloads: Hub and S3 adapters under --adapter-cache-dir, bounded in bytes.

Local adapters (--adapter-dir) are the operator's files and are never deleted. Downloads are
folders (an S3 prefix, a Hub repo's cache folder); past the byte budget the least recently used
folder that no load is reading goes. The folders found at start-up count too, oldest first.
Only a folder strictly below --adapter-cache-dir after resolution, and no symlink, is ever tracked
or deleted (`_deletable`): whatever path a manifest led to, eviction cannot reach outside.
Thread-safe (loads run on a pool): its own lock, never held together with the manager's.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("loraplex.adapters")


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                try:
                    total += os.stat(p).st_size
                except OSError:
                    pass
    return total


class DiskTier:
    def __init__(self, cache_dir: Path | None, budget_bytes: int | None):
        self.root = cache_dir.resolve() if cache_dir is not None else None
        self.budget_bytes = budget_bytes
        self.lock = threading.Lock()
        self.lru: OrderedDict[Path, int] = OrderedDict()  # folder -> bytes
        self.busy: dict[Path, int] = {}  # folder -> loads reading it
        self.bytes = 0
        self.evictions = 0
        if cache_dir is not None and cache_dir.is_dir():
            found = [p for p in cache_dir.glob("models--*") if p.is_dir()]
            found += [p.parent for p in (cache_dir / "s3").glob("**/adapter_config.json")]
            for p in sorted(filter(self._deletable, found), key=lambda p: p.stat().st_mtime):
                self.lru[p] = folder_bytes(p)
                self.bytes += self.lru[p]

    def _deletable(self, folder: Path) -> bool:
        if self.root is None or folder.is_symlink():
            return False
        real = folder.resolve()
        return real != self.root and real.is_relative_to(self.root)

    def open(self, folder: Path | None) -> None:
        """A load starts reading (or downloading into) folder: it cannot be evicted meanwhile."""
        if folder is not None:
            with self.lock:
                self.busy[folder] = self.busy.get(folder, 0) + 1

    def close(self, folder: Path | None) -> None:
        """The load is done: account folder's size, and evict past the budget."""
        if folder is None:
            return
        with self.lock:
            n = self.busy.pop(folder, 1) - 1
            if n:
                self.busy[folder] = n
            if folder.is_dir() and self._deletable(folder):
                self.bytes -= self.lru.pop(folder, 0)
                self.lru[folder] = folder_bytes(folder)
                self.bytes += self.lru[folder]
            self._evict()

    def _evict(self) -> None:
        if self.budget_bytes is None:
            return
        for folder in list(self.lru):
            if self.bytes <= self.budget_bytes:
                break
            if folder in self.busy:
                continue
            self.bytes -= self.lru.pop(folder)
            if not self._deletable(folder):  # replaced by a link since it was tracked
                log.warning("disk tier: %s now leads outside %s; forgotten, not deleted", folder, self.root)
                continue
            shutil.rmtree(folder, ignore_errors=True)
            self.evictions += 1
            log.info("disk tier: evicted %s", folder)
