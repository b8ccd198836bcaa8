"""Fetch an adapter named by a manifest to a local folder: local disk, the HF Hub, or S3.

Local paths are confined to the allowed roots (after resolving `..` and symlinks). Remote
sources are cached on disk under --adapter-cache-dir, which is the disk tier of the cache.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from loraplex.engine.core.adapters.checkpoint import AdapterFormatError
from loraplex.manifest import AdapterManifest

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterSourceError(ValueError):
    """The adapter could not be fetched (or must not be): says why."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_local(uri: str, roots: list[Path]) -> Path:
    if not roots:
        raise AdapterSourceError("local adapters are disabled: start the engine with --adapter-dir")
    candidate = Path(uri) if os.path.isabs(uri) else roots[0] / uri
    real = candidate.resolve()  # follows symlinks and collapses '..'
    if not any(_inside(real, root.resolve()) for root in roots):
        raise AdapterSourceError(f"adapter path {uri!r} is outside the allowed adapter directories")
    # A symlinked file inside the folder could still point out of it.
    for name in ADAPTER_FILES:
        f = real / name
        if f.exists() and not any(_inside(f.resolve(), root.resolve()) for root in roots):
            raise AdapterSourceError(f"{name} of adapter {uri!r} links outside the allowed adapter directories")
    if not real.is_dir():
        raise AdapterSourceError(f"adapter directory {uri!r} does not exist")
    return real


def fetch_hub(uri: str, revision: str | None, cache_dir: Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(uri, revision=revision, cache_dir=cache_dir, allow_patterns=list(ADAPTER_FILES)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise AdapterSourceError(f"could not fetch {uri}@{revision or 'main'} from the Hugging Face Hub: {exc}") from None


def fetch_s3(uri: str, cache_dir: Path | None) -> Path:
    """Download s3://bucket/prefix/{adapter files}. The endpoint and credentials come from the
    usual AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as for any boto3 client."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    if cache_dir is None:
        raise AdapterSourceError("S3 adapters need --adapter-cache-dir to download into")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    target = cache_dir / "s3" / bucket / prefix
    target.mkdir(parents=True, exist_ok=True)
    client = boto3.client("s3")
    try:
        for name in ADAPTER_FILES:
            key = f"{prefix}/{name}" if prefix else name
            tmp = target / f".{name}.{uuid.uuid4().hex}.part"  # concurrent loads of one prefix
            client.download_file(bucket, key, str(tmp))
            tmp.replace(target / name)
    except (ClientError, BotoCoreError) as exc:
        raise AdapterSourceError(f"could not fetch {uri} from S3: {exc}") from None
    return target


def fetch_adapter(manifest: AdapterManifest, adapter_dir: Path | None, cache_dir: Path | None) -> Path:
    """A local folder holding the adapter's files, digest-checked when the manifest has one."""
    if manifest.source == "local":
        roots = [p for p in (adapter_dir, cache_dir) if p is not None]
        path = resolve_local(manifest.uri, roots)
    elif manifest.source == "hub":
        path = fetch_hub(manifest.uri, manifest.revision, cache_dir)
    else:
        path = fetch_s3(manifest.uri, cache_dir)
    weights = path / "adapter_model.safetensors"
    if manifest.sha256 and weights.is_file():
        digest = file_sha256(weights)
        if digest != manifest.sha256:
            raise AdapterFormatError(f"sha256 mismatch for adapter_model.safetensors: expected {manifest.sha256}, got {digest}")
    return path
