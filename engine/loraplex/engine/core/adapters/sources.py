"""Fetch an adapter named by a manifest to a local folder: local disk, the HF Hub, or S3; and
find an unregistered name in the default source (`DefaultSource.locate`).

Every path built from a name, a uri, an S3 key or a Hub id is confined to its root after
resolution (`..` collapsed, symlinks followed), and so are the adapter files in it, before anything
is read, written or deleted: local paths to the allowed roots, downloads to their folder under
--adapter-cache-dir, the disk tier of the cache (a download that is there already is used as is,
never fetched twice while cached). The manifest schema refuses such uris first
(loraplex.manifest.path_problem); these checks hold whatever reaches them.
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from loraplex.engine.core.adapters.checkpoint import AdapterFormatError, check_checkpoint_folder
from loraplex.engine.core.errors import AdapterPathError, InvalidAdapterError, UnknownAdapterError
from loraplex.manifest import DNS1123_LABEL, HUB_REPO, AdapterManifest

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
COMPLETE = ".complete"  # written into an S3 download folder once every file is in place
S3_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class AdapterSourceError(ValueError):
    """The adapter could not be fetched (or must not be): says why."""


class AdapterNotFoundError(AdapterSourceError):
    """The source answered that the adapter does not exist."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def registry_name(name: str) -> str:
    """`name` itself when it is a valid adapter name (a DNS-1123 label), else
    `<slug>-<first 8 hex of its sha256>`: Hub ids like `org/name` get a stable name."""
    if len(name) <= 63 and DNS1123_LABEL.match(name):
        return name
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50].strip("-") or "adapter"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _inside(path: Path, root: Path) -> bool:
    return path.is_relative_to(root)


def confined(path: Path, root: Path, what: str) -> Path:
    """`path` if, resolved, it lies strictly below `root` resolved; else AdapterSourceError."""
    real, top = path.resolve(), root.resolve()
    if real == top or not real.is_relative_to(top):
        raise AdapterSourceError(f"{what} leads outside its folder {top}: refused")
    return path


def _files_confined(folder: Path, roots: list[Path], what: str) -> None:
    """A symlinked file inside the folder could still point out of it."""
    for name in ADAPTER_FILES:
        f = folder / name
        if f.exists() and not any(_inside(f.resolve(), root.resolve()) for root in roots):
            raise AdapterSourceError(f"{name} of adapter {what} links outside the allowed adapter directories")


def resolve_local(uri: str, roots: list[Path]) -> Path:
    if not roots:
        raise AdapterSourceError("local adapters are disabled: start the engine with --adapter-dir")
    candidate = Path(uri) if os.path.isabs(uri) else roots[0] / uri
    real = candidate.resolve()  # follows symlinks and collapses '..'
    if not any(_inside(real, root.resolve()) for root in roots):
        raise AdapterSourceError(f"adapter path {uri!r} is outside the allowed adapter directories")
    _files_confined(real, roots, repr(uri))
    if not real.is_dir():
        raise AdapterSourceError(f"adapter directory {uri!r} does not exist")
    return real


def hub_folder(uri: str, cache_dir: Path | None) -> Path | None:
    """Where huggingface_hub keeps repo `uri` under cache_dir (the unit the disk tier evicts)."""
    if cache_dir is None:
        return None
    return confined(cache_dir / ("models--" + uri.replace("/", "--")), cache_dir, f"Hub repo {uri!r}")


def fetch_hub(uri: str, revision: str | None, cache_dir: Path | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    kwargs = dict(revision=revision, cache_dir=cache_dir, allow_patterns=list(ADAPTER_FILES))
    try:
        path = Path(snapshot_download(uri, local_files_only=True, **kwargs))  # cached: no request at all
    except (LocalEntryNotFoundError, OSError, ValueError):
        path = None
    if path is None:
        try:
            path = Path(snapshot_download(uri, **kwargs))
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, LocalEntryNotFoundError) as exc:
            # LocalEntryNotFoundError here: offline (HF_HUB_OFFLINE) and not in the cache
            raise AdapterNotFoundError(f"adapter {uri}@{revision or 'main'} was not found on the Hugging Face Hub "
                                       f"(or in its cache): {type(exc).__name__}") from None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise AdapterSourceError(f"could not fetch {uri}@{revision or 'main'} from the Hugging Face Hub: {exc}") from None
    # A revision names a path in the repo's folder: the snapshot, and its files, must stay in it.
    folder = hub_folder(uri, cache_dir if cache_dir is not None else Path(constants.HF_HUB_CACHE))
    confined(path, folder, f"revision {revision!r} of Hub repo {uri!r}")
    _files_confined(path, [folder], repr(uri))
    return path


def s3_folder(uri: str, cache_dir: Path | None) -> Path | None:
    if cache_dir is None:
        return None
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return confined(cache_dir / "s3" / bucket / prefix.strip("/"), cache_dir / "s3", f"S3 uri {uri!r}")


def fetch_s3(uri: str, cache_dir: Path | None) -> Path:
    """Download s3://bucket/prefix/{adapter files}, unless a complete copy is cached. The endpoint
    and credentials come from the usual AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    if cache_dir is None:
        raise AdapterSourceError("S3 adapters need --adapter-cache-dir to download into")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    target = s3_folder(uri, cache_dir)
    if (target / COMPLETE).is_file() and all((target / n).is_file() for n in ADAPTER_FILES):
        _files_confined(target, [target], repr(uri))
        return target
    target.mkdir(parents=True, exist_ok=True)
    client = boto3.client("s3")
    try:
        for name in ADAPTER_FILES:
            key = f"{prefix}/{name}" if prefix else name
            tmp = target / f".{name}.{uuid.uuid4().hex}.part"  # concurrent loads of one prefix
            try:
                client.download_file(bucket, key, str(tmp))
            finally:
                if tmp.exists() and not (target / name).exists():
                    tmp.replace(target / name)
                tmp.unlink(missing_ok=True)
        (target / COMPLETE).touch()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            raise AdapterNotFoundError(f"adapter {uri} was not found in S3 ({code})") from None
        raise AdapterSourceError(f"could not fetch {uri} from S3: {exc}") from None
    except BotoCoreError as exc:
        raise AdapterSourceError(f"could not fetch {uri} from S3: {exc}") from None
    return target


def download_folder(manifest: AdapterManifest, cache_dir: Path | None) -> Path | None:
    """The disk-tier folder a remote manifest downloads into (None for local adapters)."""
    if manifest.source == "hub":
        return hub_folder(manifest.uri, cache_dir)
    if manifest.source == "s3":
        return s3_folder(manifest.uri, cache_dir)
    return None


def fetch_adapter(manifest: AdapterManifest, adapter_dir: Path | None, cache_dir: Path | None) -> Path:
    """A local folder holding the adapter's files (their digests are checked as they are parsed:
    checkpoint.load_adapter)."""
    if manifest.source == "local":
        roots = [p for p in (adapter_dir, cache_dir) if p is not None]
        return resolve_local(manifest.uri, roots)
    if manifest.source == "hub":
        return fetch_hub(manifest.uri, manifest.revision, cache_dir)
    return fetch_s3(manifest.uri, cache_dir)


def location_key(manifest: AdapterManifest, adapter_dir: Path | None) -> tuple:
    """What two manifests share when they name the same adapter files."""
    if manifest.source == "local":
        path = Path(manifest.uri) if os.path.isabs(manifest.uri) or adapter_dir is None else adapter_dir / manifest.uri
        try:
            return ("local", str(path.resolve()))
        except (OSError, RuntimeError):
            return ("local", str(path))
    if manifest.source == "s3":
        return ("s3", manifest.uri.rstrip("/"))
    return ("hub", manifest.uri, manifest.revision)


class DefaultSource:
    """--adapter-source as the home of every unregistered name: `locate(name)` checks that
    the name is safe, that it exists there, and that it is a PEFT checkpoint (fetching a remote
    one into the disk tier), and returns the manifest to register. Blocking I/O: call it off the
    event loop and off the step loop. Raises RequestError subclasses (400, 404, 422, 424)."""

    def __init__(self, source: str, adapter_dir: Path | None, cache_dir: Path | None, s3_prefix: str | None):
        self.source = source
        self.adapter_dir = adapter_dir
        self.cache_dir = cache_dir
        self.s3_prefix = s3_prefix.rstrip("/") + "/" if s3_prefix else None
        if self.s3_prefix:  # checked once here, as a manifest's uri is: every name goes below it
            try:
                AdapterManifest(name="prefix", source="s3", uri=self.s3_prefix + "x")
            except ValidationError as exc:
                raise ValueError(f"--adapter-s3-prefix {s3_prefix!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None

    @property
    def usable(self) -> bool:
        if self.source == "local":
            return self.adapter_dir is not None
        if self.source == "s3":
            return self.s3_prefix is not None and self.cache_dir is not None
        return True

    def uri_for(self, name: str) -> str:
        """The manifest uri of `name` (400 for names that could escape their root)."""
        if not name or len(name) > 512 or "\x00" in name or "\\" in name:
            raise AdapterPathError(f"invalid adapter name {name[:80]!r}", param="model")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts:
            raise AdapterPathError(f"adapter name {name!r} escapes the adapter directory", param="model")
        if self.source == "hub":
            if not HUB_REPO.match(name):
                raise AdapterPathError(f"{name!r} is not a Hugging Face repo id (org/name)", param="model")
            return name
        if self.source == "s3":
            if not all(S3_KEY_PART.match(p) for p in name.split("/")):
                raise AdapterPathError(f"{name!r} is not a valid adapter key under {self.s3_prefix}", param="model")
            return self.s3_prefix + name
        # A local spelling (`./x`, `x/`, `x//y`) becomes its plain relative path: the manifest refuses
        # `.` and empty segments, and every spelling of one folder must be one uri.
        plain = str(PurePosixPath(name))
        if plain == ".":
            raise AdapterPathError(f"adapter name {name!r} names the adapter directory itself", param="model")
        return plain

    def locate(self, name: str) -> AdapterManifest:
        uri = self.uri_for(name)
        if self.source == "local":
            path = self._local(name)
        else:
            try:
                path = fetch_hub(uri, None, self.cache_dir) if self.source == "hub" else fetch_s3(uri, self.cache_dir)
            except AdapterNotFoundError as exc:
                raise UnknownAdapterError(f"the model {name!r} does not exist: {exc}", param="model") from None
            except AdapterSourceError as exc:
                from loraplex.engine.core.errors import AdapterUnavailableError

                raise AdapterUnavailableError(str(exc), param="model") from None
        try:
            check_checkpoint_folder(path)
        except AdapterFormatError as exc:
            raise InvalidAdapterError(f"{name!r} is not a PEFT LoRA checkpoint: {exc}", param="model") from None
        return AdapterManifest(name=registry_name(name), source=self.source, uri=uri)

    def _local(self, name: str) -> Path:
        root = self.adapter_dir.resolve()
        real = (root / name).resolve()  # follows symlinks, collapses '.'
        if not _inside(real, root):
            raise AdapterPathError(f"adapter name {name!r} leads outside the adapter directory", param="model")
        if not real.exists():
            raise UnknownAdapterError(f"the model {name!r} does not exist", param="model")
        if not real.is_dir():
            raise InvalidAdapterError(f"{name!r} is not a PEFT LoRA checkpoint: not a folder", param="model")
        for f in ADAPTER_FILES:
            if (real / f).exists() and not _inside((real / f).resolve(), root):
                raise AdapterPathError(f"{f} of adapter {name!r} links outside the adapter directory", param="model")
        return real
