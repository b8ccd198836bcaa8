"""The adapter manifest: the one contract shared by the engine and the operator.

This module must stay light (pydantic and the standard library only): the operator imports it
and its install carries no torch.

Digests: `sha256` is the sha256 of adapter_model.safetensors and `config_sha256` that of
adapter_config.json, the only two files the engine reads from an adapter. Each is verified on the
bytes the engine parses; pin both to pin the adapter (the config sets ranks, alphas and patterns).

Paths: a uri (a local path, an S3 key prefix) and a Hub revision are joined under a root by the
engine, so they may hold no '.', '..' or empty segments, no backslash, no '%' (no
percent-encoding) and no control character (`path_problem`). The engine checks every path again
after resolving it (symlinks included) before it reads, writes or deletes anything.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
BAD_PATH_CHARS = re.compile(r"[\\%\x00-\x1f\x7f]")


def path_problem(path: str, absolute_ok: bool = False) -> str | None:
    """Why `path`, joined under a root, could lead somewhere other than below it; None if it
    cannot. One trailing '/' is allowed, a leading one only when absolute_ok."""
    bad = BAD_PATH_CHARS.search(path)
    if bad:
        return f"it holds {bad.group()!r} (no backslash, '%' or control character)"
    parts = path.split("/")
    if absolute_ok and path.startswith("/"):
        parts = parts[1:]
    if len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]
    if any(p in ("", ".", "..") for p in parts):
        return "it has an empty, '.' or '..' path segment"
    return None
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class AdapterState(str, Enum):
    """Where an adapter stands inside one engine process."""

    REGISTERED = "registered"  # known, weights not loaded
    LOADING = "loading"  # fetch/parse in progress, off the step loop
    HOST = "host"  # weights in host RAM, no device slot
    DEVICE = "device"  # weights in a device slot, servable without a copy
    FAILED = "failed"  # load failed; `message` says why


class AdapterManifest(BaseModel):
    """One adapter, as tenants name it and as the engine fetches it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the model name tenants send; a DNS-1123 label")
    source: Literal["local", "hub", "s3"] = "local"
    uri: str = Field(min_length=1)
    revision: str | None = None
    sha256: str | None = None  # of adapter_model.safetensors
    config_sha256: str | None = None  # of adapter_config.json
    preload: bool = False
    tenants: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name_is_dns_label(cls, v: str) -> str:
        if len(v) > 63 or not DNS1123_LABEL.match(v):
            raise ValueError(
                f"adapter name {v!r} must be a DNS-1123 label: lowercase letters, digits and '-', "
                "starting and ending with an alphanumeric, at most 63 characters"
            )
        return v

    @field_validator("sha256", "config_sha256")
    @classmethod
    def _sha256_is_hex(cls, v: str | None, info) -> str | None:
        if v is not None and not SHA256_HEX.match(v.lower()):
            raise ValueError(f"{info.field_name} must be 64 hexadecimal characters")
        return v.lower() if v else v

    @field_validator("tenants")
    @classmethod
    def _tenants_are_hashes(cls, v: list[str]) -> list[str]:
        for t in v:
            if not SHA256_HEX.match(t):
                raise ValueError("tenants must be sha256 hex digests of API keys, never raw keys")
        return v

    @model_validator(mode="after")
    def _uri_fits_source(self) -> "AdapterManifest":
        if self.source == "s3" and not S3_URI.match(self.uri):
            raise ValueError(f"source s3 needs a uri like s3://bucket/prefix, got {self.uri!r}")
        if self.source == "hub" and not HUB_REPO.match(self.uri):
            raise ValueError(f"source hub needs a repo id like org/name, got {self.uri!r}")
        if self.source != "hub" and self.revision is not None:
            raise ValueError("revision applies only to source hub")
        path = self.uri[len("s3://"):].partition("/")[2] if self.source == "s3" else self.uri  # the key prefix
        problem = path and path_problem(path, absolute_ok=self.source == "local")  # "": a bucket's root
        if problem:
            raise ValueError(f"uri {self.uri!r} is refused: {problem}")
        if self.revision is not None and (problem := path_problem(self.revision)):
            raise ValueError(f"revision {self.revision!r} is refused: {problem}")
        return self


def manifest_digest(manifest: AdapterManifest) -> str:
    """16 hex of the sha256 of the manifest's canonical JSON: the operator and an engine compare
    what was pushed with what is registered by this, without shipping the manifests back."""
    blob = json.dumps(manifest.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hash_api_key(key: str) -> str:
    """The form in which API keys travel and are stored: sha256 hex of the raw key."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_manifest_list(text: str) -> list[AdapterManifest]:
    """Parse a manifest file: `{"adapters": [...]}` or a bare JSON list. Names must be unique."""
    data = json.loads(text) if text.strip() else []
    if isinstance(data, dict):
        data = data.get("adapters", [])
    if not isinstance(data, list):
        raise ValueError("a manifest file holds a JSON list of adapters or {\"adapters\": [...]}")
    manifests = [AdapterManifest.model_validate(item) for item in data]
    dupes = sorted(n for n, count in Counter(m.name for m in manifests).items() if count > 1)
    if dupes:
        raise ValueError(f"duplicate adapter names in manifest list: {dupes}")
    return manifests


def dump_manifest_list(manifests: list[AdapterManifest]) -> str:
    """Canonical serialisation (sorted by name) so that an unchanged set renders byte-identical."""
    items = [m.model_dump(exclude_none=True) for m in sorted(manifests, key=lambda m: m.name)]
    return json.dumps({"adapters": items}, indent=2, sort_keys=True) + "\n"


def load_manifest_file(path: str | Path) -> list[AdapterManifest]:
    return parse_manifest_list(Path(path).read_text())
