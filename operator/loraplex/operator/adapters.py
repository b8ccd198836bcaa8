"""From a LoraAdapter custom resource to the adapter manifest the engines get: pure functions.

The manifest schema is loraplex.manifest (shared with the engine). API keys are read from
Secrets by the caller and enter the manifest only as salted hashes (manifest.salted_key_hash),
with one salt per base (tenant_salt): unique to the deployment, and stable, so that a manifest
renders the same at every pass (its digest does not churn) and the engines derive a presented
key's hash once for all the base's adapters.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from pydantic import ValidationError

from loraplex.manifest import DNS1123_LABEL, AdapterManifest, manifest_digest, salted_key_hash  # noqa: F401 (A.manifest_digest)

DEFAULT_SOURCE_TYPE = "hub"


@dataclass(frozen=True)
class SpecProblem(Exception):
    """Why a LoraAdapter cannot be accepted. `reason` is a CamelCase condition reason."""

    reason: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str | None  # None: every entry of the Secret is one API key


def secret_key_refs(refs: list[dict] | None) -> list[SecretKeyRef]:
    """`apiKeySecretRefs` ({name, key?} items: a LoraAdapter's access, a base's tenants) as refs."""
    return [SecretKeyRef(name=str(r["name"]), key=r.get("key")) for r in refs or []]


def api_key_refs(spec: dict) -> list[SecretKeyRef]:
    return secret_key_refs((spec.get("access") or {}).get("apiKeySecretRefs"))


def _decode(value: str) -> str:
    return base64.b64decode(value).decode("utf-8").strip()


def tenant_salt(namespace: str, base: str) -> str:
    """The salt of the tenant hashes of one base's adapters."""
    digest = hashlib.sha256(f"loraplex tenants\0{namespace}\0{base}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


def tenant_hashes(refs: list[SecretKeyRef], secrets: dict[str, dict | None], salt: str) -> list[str]:
    """Salted hashes of the API keys the refs point at. `secrets` maps name -> Secret body
    (None when it does not exist). Fails closed: a missing Secret or key is a SpecProblem, never
    an adapter silently opened to everyone."""
    hashes: set[str] = set()
    for ref in refs:
        secret = secrets.get(ref.name)
        if secret is None:
            raise SpecProblem("SecretNotFound", f"API key Secret {ref.name!r} not found")
        data = secret.get("data") or {}
        if ref.key is not None:
            if ref.key not in data:
                raise SpecProblem("SecretKeyNotFound", f"Secret {ref.name!r} has no key {ref.key!r}")
            values = [data[ref.key]]
        else:
            values = [data[k] for k in sorted(data)]
            if not values:
                raise SpecProblem("SecretKeyNotFound", f"Secret {ref.name!r} holds no API keys")
        for v in values:
            try:
                key = _decode(v)
            except (ValueError, UnicodeDecodeError) as e:
                raise SpecProblem("InvalidSecret", f"Secret {ref.name!r} holds a value that is not "
                                                   f"base64 UTF-8 text: {e}") from e
            if not key:
                raise SpecProblem("InvalidSecret", f"Secret {ref.name!r} holds an empty API key")
            hashes.add(salted_key_hash(key, salt))
    return sorted(hashes)


def admin_token_ref(base_spec: dict | None, base_name: str) -> SecretKeyRef:
    """The base's admin token Secret: the one its spec names, else the one the operator creates."""
    ref = ((base_spec or {}).get("engine") or {}).get("adminTokenSecretRef")
    if not ref:
        return SecretKeyRef(name=f"{base_name}-admin-token", key="token")
    return SecretKeyRef(name=str(ref["name"]), key=ref.get("key") or "token")


def admin_token(ref: SecretKeyRef, secret: dict | None) -> str:
    """The engines' admin token from its Secret (SpecProblem when it cannot be read)."""
    if secret is None:
        raise SpecProblem("SecretNotFound", f"admin token Secret {ref.name!r} of the base not found")
    value = (secret.get("data") or {}).get(ref.key or "token")
    if value is None:
        raise SpecProblem("SecretKeyNotFound", f"Secret {ref.name!r} has no key {ref.key!r}")
    try:
        token = _decode(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecProblem("InvalidSecret", f"Secret {ref.name!r}: {e}") from e
    if not token:
        raise SpecProblem("InvalidSecret", f"Secret {ref.name!r} holds an empty admin token")
    return token


def validate(name: str, spec: dict, base_spec: dict | None) -> None:
    """Checks that need more than the CRD schema could express (or that an API server without
    CEL would have let through). Raises SpecProblem."""
    if len(name) > 63 or not DNS1123_LABEL.match(name):
        raise SpecProblem("InvalidName", f"adapter name {name!r} is not a DNS-1123 label and cannot "
                                         "be used as a model id")
    if base_spec is None:
        raise SpecProblem("BaseNotFound", f"BaseModelDeployment {spec.get('baseModel')!r} not found "
                                          "in this namespace")
    rank = spec.get("rank")
    max_rank = ((base_spec.get("engine") or {}).get("maxLoraRank"))
    if rank is not None and max_rank is not None and int(rank) > int(max_rank):
        raise SpecProblem("RankTooLarge", f"adapter rank {rank} exceeds maxLoraRank {max_rank} of "
                                          f"BaseModelDeployment {spec.get('baseModel')!r}")


def build_manifest(name: str, spec: dict, tenants: list[str]) -> AdapterManifest:
    """The manifest for `name`; a source that does not fit its type is a SpecProblem."""
    src = spec.get("source") or {}
    data = {
        "name": name,
        "source": src.get("type") or DEFAULT_SOURCE_TYPE,
        "uri": src.get("uri") or "",
        "preload": bool(spec.get("preload", False)),
        "tenants": list(tenants),
    }
    if src.get("revision"):
        data["revision"] = src["revision"]
    if src.get("sha256"):
        data["sha256"] = src["sha256"]
    if src.get("configSha256"):
        data["config_sha256"] = src["configSha256"]
    try:
        return AdapterManifest.model_validate(data)
    except ValidationError as e:
        msgs = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise SpecProblem("InvalidSource", msgs) from e


def manifest_json(manifest: AdapterManifest) -> dict:
    return manifest.model_dump(exclude_none=True)


# Engine load errors that are not the adapter's fault: the source (Hub, S3) answered with a
# server error, or did not answer. The engine words them "could not fetch ... : <cause>".
_FETCH = re.compile(r"could not fetch", re.I)
_FETCH_PERMANENT = re.compile(r"\b(401|403|404)\b|not found|does not exist|NoSuchKey|NoSuchBucket|AccessDenied"
                              r"|RepositoryNotFound|RevisionNotFound|EntryNotFound|GatedRepo", re.I)
_TRANSPORT = re.compile(r"timed? ?out|timeout|temporar|connection (reset|refused|aborted)|\b5\d\d\b"
                        r"|service unavailable|slow down|throttl", re.I)


def is_transient(message: str) -> bool:
    """Whether a failed load should be retried without end (transient) or counts towards
    giving up (permanent: a bad checkpoint, a sha256 mismatch, an adapter for another base,
    a source that does not exist)."""
    if _FETCH.search(message):
        return not _FETCH_PERMANENT.search(message)
    return bool(_TRANSPORT.search(message)) and not re.search(r"sha256|safetensors|adapter_config", message)
