"""Cache helpers for the demo assets: content hashes, stamps, atomic folder and file writes.

Only the standard library, so that a fully cached run never imports torch or transformers.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Written inside every finished output folder. A dotfile, so that tools listing the folder
# (the engine scanning --adapter-dir) can ignore it like any hidden file.
STAMP_NAME = ".loraplex-demo-stamp.json"
TEMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: object) -> str:
    """Hash of a JSON-able object, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def read_stamp(folder: Path) -> dict | None:
    """The stamp of a finished folder, or None when missing or unreadable (treated as stale)."""
    try:
        return json.loads((folder / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_stamp(folder: Path, data: dict) -> None:
    (folder / STAMP_NAME).write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def cache_lock(cache_dir: Path) -> Iterator[None]:
    """Serialise runs on one cache dir (two `make serve` at once must not race on the renames)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".demo-assets.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_temps(parent: Path) -> None:
    """Drop temp/old folders left by an interrupted run. Call only while holding cache_lock."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if p.name.startswith(".") and (TEMP_MARK in p.name or OLD_MARK in p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `final`; on success it replaces `final`.

    The temp folder is a hidden sibling (same filesystem, so rename is atomic) and is removed if
    the body raises, so `final` only ever holds a complete result. Replacing an existing folder
    takes two renames (old aside, new in); in between `final` is briefly absent, never partial.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_MARK}", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the result should read like a normal mkdir
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}{OLD_MARK}{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_if_changed(path: Path, text: str) -> bool:
    """Atomically write `text` unless the file already holds it; returns whether it wrote.

    Skipping identical writes keeps the mtime still, so a watcher on the file (the engine's
    manifest reload) does not fire on every `make serve`.
    """
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True
