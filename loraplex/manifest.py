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

import base64
import functools
import hashlib
import json
import re
import secrets
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
# A salted API key hash: pbkdf2_sha256$<iterations>$<salt>$<64 hex> (see salted_key_hash).
SALTED_KEY_HASH = re.compile(r"^pbkdf2_sha256\$([1-9][0-9]{0,6})\$([A-Za-z0-9._-]{8,64})\$([0-9a-f]{64})$")
KEY_HASH_ITERATIONS = 1_000
MAX_KEY_HASH_ITERATIONS = 1_000_000


class AdapterState(str, Enum):
    """Where an adapter stands inside one engine process."""

    REGISTERED = "registered"  # known, weights not loaded
    LOADING = "loading"  # fetch/parse in progress, off the step loop
    HOST = "host"  # weights in host RAM, no device slot
    DEVICE = "device"  # weights in a device slot, servable without a copy
    FAILED = "failed"  # load failed; `message` says why


class AdapterWeights(BaseModel):
    """Where one set of adapter weights is fetched from, and the digests that pin it."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["local", "hub", "s3"] = "local"
    uri: str = Field(min_length=1)
    revision: str | None = None  # a Hub revision (branch, tag, commit); not an adapter revision
    sha256: str | None = None  # of adapter_model.safetensors
    config_sha256: str | None = None  # of adapter_config.json

    @field_validator("sha256", "config_sha256")
    @classmethod
    def _sha256_is_hex(cls, v: str | None, info) -> str | None:
        if v is not None and not SHA256_HEX.match(v.lower()):
            raise ValueError(f"{info.field_name} must be 64 hexadecimal characters")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _uri_fits_source(self):
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

    def weights(self) -> dict:
        """The weight fields alone (source, uri, revision, sha256, config_sha256), Nones dropped."""
        return {k: getattr(self, k) for k in AdapterWeights.model_fields if getattr(self, k) is not None}


# ---- adapter revisions --------------------------------------------------------------------------
#
# A LoraAdapter's weights change by revisions: each change of its source is a new immutable
# revision, numbered from 1 (LoraAdapter status.revisions). A manifest with `revisions` lists the
# revisions in use on the engines and each one's share of the requests for the name (percent,
# summing to 100; 0: loaded and pinnable as `<name>@<number>`, never picked). The engine serves
# each revision as its own adapter under the key `<name>@<number>`, so weights, device slots,
# prefix cache entries and metrics of two revisions never mix.

MAX_SERVED_REVISIONS = 16  # revisions one manifest may list
REVISION_SEPARATOR = "@"
MODEL_REVISION = re.compile(r"^(?P<name>[a-z0-9]([-a-z0-9]*[a-z0-9])?)@(?P<number>[1-9][0-9]{0,9})$")


class AdapterRevision(AdapterWeights):
    """One immutable revision of an adapter's weights, and its share of the name's requests."""

    number: int = Field(ge=1, le=2**31 - 1)
    percent: int = Field(ge=0, le=100)


def revision_key(name: str, number: int) -> str:
    """The engine's key for one revision of an adapter, and the model name that pins it."""
    return f"{name}{REVISION_SEPARATOR}{number}"


def split_revision(model: str) -> tuple[str, int | None]:
    """A requested model name as (adapter name, pinned revision number or None): `support@3`
    pins revision 3 of `support`; anything else (no '@', a Hub id) is returned whole."""
    m = MODEL_REVISION.match(model)
    return (m["name"], int(m["number"])) if m else (model, None)


class AdapterManifest(AdapterWeights):
    """One adapter, as tenants name it and as the engine fetches it.

    Without `revisions`, the weight fields are what the engine serves under the name. With
    `revisions`, the engine serves only those (each under `<name>@<number>`, requests for the name
    split by percent); the weight fields then describe the adapter's latest weights (the
    LoraAdapter's spec.source), for tools that read a manifest without knowing revisions."""

    name: str = Field(description="the model name tenants send; a DNS-1123 label")
    preload: bool = False
    tenants: list[str] = Field(default_factory=list)
    revisions: list[AdapterRevision] | None = Field(default=None, max_length=MAX_SERVED_REVISIONS)

    @field_validator("name")
    @classmethod
    def _name_is_dns_label(cls, v: str) -> str:
        if len(v) > 63 or not DNS1123_LABEL.match(v):
            raise ValueError(
                f"adapter name {v!r} must be a DNS-1123 label: lowercase letters, digits and '-', "
                "starting and ending with an alphanumeric, at most 63 characters"
            )
        return v

    @field_validator("tenants")
    @classmethod
    def _tenants_are_hashes(cls, v: list[str]) -> list[str]:
        for t in v:
            if not (SHA256_HEX.match(t) or _salted(t)):
                raise ValueError("tenants must be hashes of API keys (pbkdf2_sha256$<iterations 1..1000000>$<salt: "
                                 "8-64 of A-Za-z0-9._->$<64 hex>, or a sha256 hex digest), never raw keys")
        return v

    @field_validator("revisions")
    @classmethod
    def _revisions_split_the_name(cls, v: list[AdapterRevision] | None) -> list[AdapterRevision] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("revisions, when given, lists at least one revision")
        numbers = [r.number for r in v]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"revision numbers must be unique, got {numbers}")
        total = sum(r.percent for r in v)
        if total != 100:
            raise ValueError(f"the revisions' percents must sum to 100, got {total}")
        return sorted(v, key=lambda r: r.number)

    def revision_manifests(self) -> list[tuple[AdapterRevision, "AdapterManifest"]]:
        """Each served revision with the single-weights manifest the engine registers for it
        (named `<name>@<number>`, the adapter's preload and tenants); [] without revisions."""
        out = []
        for r in self.revisions or []:
            m = AdapterManifest.model_construct(  # validated as AdapterRevision; the name holds '@' on purpose
                name=revision_key(self.name, r.number), preload=self.preload, tenants=list(self.tenants),
                revisions=None, **{k: getattr(r, k) for k in AdapterWeights.model_fields})
            out.append((r, m))
        return out


def manifest_digest(manifest: AdapterManifest) -> str:
    """16 hex of the sha256 of the manifest's canonical JSON: the operator and an engine compare
    what was pushed with what is registered by this, without shipping the manifests back."""
    blob = json.dumps(manifest.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hash_api_key(key: str) -> str:
    """sha256 hex of a raw key: the key's digest, what the engine computes for a presented key
    and the input of salted_key_hash. As a stored form (in `tenants`, or `sha256:` in a keys
    file) it is deprecated: unsalted, one digest means one key everywhere."""
    return hashlib.sha256(key.encode()).hexdigest()


# ---- salted API key hashes ----------------------------------------------------------------------
#
# pbkdf2_sha256$<iterations>$<salt>$<hex of PBKDF2-HMAC-SHA256(hash_api_key(key), salt, iterations)>
#
# The salt makes a stored hash useless beyond its deployment (no precomputed tables, no linking
# one key's hashes across deployments). The work factor is modest on purpose: a server computes
# it for every key it has not seen (a flood of made-up keys) and the operator for every tenant
# key it renders; API keys must be random (128 bits or more), which no iteration count replaces.
# Matching stays cheap: a key's derived hash per (salt, iterations) is cached (bounded LRU of the
# digests, never the raw keys), and entries sharing a salt cost one derivation for all of them.


def salted_key_hash(key: str, salt: str | None = None, iterations: int = KEY_HASH_ITERATIONS) -> str:
    """The salted form of an API key (a random salt unless one is given)."""
    salt = salt or base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
    entry = f"pbkdf2_sha256${iterations}${salt}${_derive(hash_api_key(key), salt, iterations)}"
    if not _salted(entry):
        raise ValueError(f"salt must be 8-64 of A-Za-z0-9._- and iterations 1..{MAX_KEY_HASH_ITERATIONS}")
    return entry


@functools.lru_cache(maxsize=16384)  # ~6 MB at most
def _derive(digest: str, salt: str, iterations: int) -> str:
    return hashlib.pbkdf2_hmac("sha256", digest.encode(), salt.encode(), iterations).hex()


def _salted(entry: str) -> tuple[int, str, str] | None:
    """(iterations, salt, hex) of a salted entry, else None."""
    m = SALTED_KEY_HASH.match(entry)
    if m is None or int(m[1]) > MAX_KEY_HASH_ITERATIONS:
        return None
    return int(m[1]), m[2], m[3]


def key_matches(digest: str | None, entries: list[str]) -> bool:
    """Whether the key of this digest (hash_api_key of the presented key) is one of `entries`
    (salted hashes or plain digests)."""
    if digest is None:
        return False
    for entry in entries:
        salted = _salted(entry)
        if salted is None:
            if entry == digest:
                return True
        elif _derive(digest, salted[1], salted[0]) == salted[2]:
            return True
    return False


class KeyIndex:
    """Stored key hashes (salted or plain) -> a value (the tenant), looked up by a presented
    key's digest: one derivation per distinct (salt, iterations), cached."""

    def __init__(self):
        self.plain: dict[str, str] = {}
        self.salted: dict[tuple[int, str], dict[str, str]] = {}

    def add(self, entry: str, value: str) -> str | None:
        """Index `entry`; returns the value it already had, if any. ValueError when `entry` is
        neither form."""
        salted = _salted(entry)
        if salted is not None:
            table, key = self.salted.setdefault((salted[0], salted[1]), {}), salted[2]
        elif SHA256_HEX.match(entry):
            table, key = self.plain, entry
        else:
            raise ValueError("not a key hash")
        other = table.get(key)
        table.setdefault(key, value)
        return other

    def get(self, digest: str | None) -> str | None:
        if digest is None:
            return None
        if digest in self.plain:
            return self.plain[digest]
        for (iterations, salt), table in self.salted.items():
            value = table.get(_derive(digest, salt, iterations))
            if value is not None:
                return value
        return None

    def __contains__(self, digest: str | None) -> bool:
        return self.get(digest) is not None


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
