"""Tenants of a base: `spec.tenants` rendered into the engines' API keys file, the Secret
`<base>-api-keys` that the engine pods mount (`--api-keys-file`, re-read on change).

The file, one entry per tenant (the engine's format, docs/api.md):
    {"acme": {"keys": ["pbkdf2_sha256$1000$<salt>$<hex>", ...], "weight": 2,
              "limits": {"requests_per_minute": 200, "tokens_per_minute": 66667, "max_concurrent": 6}}}
Keys enter it only as salted hashes (adapters.tenant_hashes: the same Secrets-to-hashes code, and
the same per-base salt, as a LoraAdapter's access list). Each limit is the tenant's fleet-wide
limit divided over the ready engine pods, rounded up, at least 1 (`per_pod`): every pod enforces
its share. The operator renders the file again when the number of ready pods changes, so the
shares follow the fleet (docs/operator.md, "Tenants", for the error bound of that split).

A broken ref (a Secret or key missing, an unreadable value, a key listed for two tenants) fails
that tenant only, and closed: it keeps the keys it had in the file already written (one broken
ref must not lock a tenant out, nor open anything), or has none if it never had any. Every other
tenant is rendered as declared. The TenantsReady condition says which tenant and why; status.py
turns its transitions into Events.

`resolve`, `per_pod`, `keys_file` and `previous_entries` are pure; `ensure_api_keys` does the I/O,
writes only on a difference, and skips a pass whose inputs (the declared tenants, the ready-pod
count, the Secret cache's epoch) did not change.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraplex.manifest import DNS1123_LABEL, SALTED_KEY_HASH

from . import adapters as A
from . import apply
from . import constants as C
from . import limits
from . import render
from . import status as S
from .constants import Key
from .kube import ApiError, Ref
from .owned import announce

if TYPE_CHECKING:
    from .runtime import Runtime

CONDITION = "TenantsReady"
# spec.tenants[].limits -> the engine's names, in the file.
LIMIT_FIELDS = (("requestsPerMinute", "requests_per_minute"), ("tokensPerMinute", "tokens_per_minute"),
                ("maxConcurrent", "max_concurrent"))


@dataclass(frozen=True)
class TenantProblem:
    tenant: str
    reason: str      # CamelCase: SecretNotFound, SecretKeyNotFound, InvalidSecret, DuplicateKey, InvalidTenant
    message: str


@dataclass
class Resolved:
    """The file's entries, and what went wrong on the way."""

    entries: dict[str, dict] = field(default_factory=dict)
    problems: list[TenantProblem] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)     # broken tenants serving on their previous keys
    locked: list[str] = field(default_factory=list)   # broken tenants with no previous keys: no access


@dataclass(frozen=True)
class Outcome:
    stamp: tuple
    condition: dict


@dataclass
class TenantState:
    """Per base, the inputs of the last rendering and the condition it gave."""

    last: dict[Key, Outcome] = field(default_factory=dict)


def per_pod(limit: int, ready: int) -> int:
    """One pod's share of a fleet-wide limit: ceil(limit / ready pods), at least 1. With N pods
    the fleet admits at most N * ceil(L / N) <= L + N - 1 (even routing)."""
    n = max(1, int(ready))
    return max(1, -(-int(limit) // n))


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _entry(tenant: dict, hashes: list[str], ready: int) -> dict:
    entry: dict = {"keys": sorted(hashes)}
    if tenant.get("weight") is not None:
        entry["weight"] = int(tenant["weight"])
    lim = tenant.get("limits") or {}
    divided = {name: per_pod(lim[field_], ready) for field_, name in LIMIT_FIELDS if lim.get(field_) is not None}
    if divided:
        entry["limits"] = divided
    return entry


def _check(tenant: dict) -> None:
    """What the CRD's schema says, again, for an API server (or an emulator) that did not check."""
    name = tenant.get("name")
    if not isinstance(name, str) or len(name) > 63 or not DNS1123_LABEL.match(name):
        raise A.SpecProblem("InvalidTenant", f"the name {name!r} is not a DNS-1123 label")
    if not tenant.get("apiKeySecretRefs"):
        raise A.SpecProblem("InvalidTenant", "it has no apiKeySecretRefs")
    if tenant.get("weight") is not None and not _positive_int(tenant["weight"]):
        raise A.SpecProblem("InvalidTenant", f"weight {tenant['weight']!r} is not a positive integer")
    for field_, _ in LIMIT_FIELDS:
        value = (tenant.get("limits") or {}).get(field_)
        if value is not None and not _positive_int(value):
            raise A.SpecProblem("InvalidTenant", f"limits.{field_} {value!r} is not a positive integer")


def resolve(tenants: list[dict], secrets: dict[str, dict | None], salt: str, ready: int,
            previous: dict[str, list[str]]) -> Resolved:
    """The entries of the API keys file. `secrets`: name -> Secret body (None when missing);
    `previous`: tenant -> key hashes of the file written before (the fallback of a broken
    tenant). One key belongs to one tenant (the engine refuses a file that lists a key twice): a
    tenant whose key an earlier tenant already has is broken (DuplicateKey)."""
    out = Resolved()
    claimed: dict[str, str] = {}  # key hash -> tenant
    seen: set[str] = set()
    for tenant in tenants:
        name = str(tenant.get("name"))
        if name in seen:
            out.problems.append(TenantProblem(name, "InvalidTenant", "declared twice; the first is used"))
            continue
        seen.add(name)
        try:
            _check(tenant)
            hashes = A.tenant_hashes(A.secret_key_refs(tenant.get("apiKeySecretRefs")), secrets, salt)
            taken = sorted({claimed[h] for h in hashes if h in claimed})
            if taken:
                raise A.SpecProblem("DuplicateKey", f"it lists an API key of tenant {taken[0]!r} too "
                                                    "(one key, one tenant)")
        except A.SpecProblem as problem:
            out.problems.append(TenantProblem(name, problem.reason, problem.message))
            hashes = [h for h in previous.get(name, []) if h not in claimed]
            if not hashes:
                out.locked.append(name)
                continue
            out.kept.append(name)
        for h in hashes:
            claimed[h] = name
        out.entries[name] = _entry(tenant, hashes, ready)
    return out


def keys_file(entries: dict[str, dict]) -> str:
    """The file's text: canonical (an unchanged set renders byte-identical), compact."""
    return json.dumps(entries, sort_keys=True, separators=(",", ":")) + "\n"


def previous_entries(secret: dict | None) -> dict[str, list[str]]:
    """tenant -> salted key hashes of a rendered Secret (anything else in it is ignored)."""
    value = ((secret or {}).get("data") or {}).get(C.API_KEYS_KEY)
    try:
        data = json.loads(base64.b64decode(value or "", validate=True) or b"{}")
    except (binascii.Error, ValueError):
        return {}
    out: dict[str, list[str]] = {}
    for tenant, entry in (data.items() if isinstance(data, dict) else ()):
        keys = entry.get("keys") if isinstance(entry, dict) else None
        hashes = [k for k in keys or [] if isinstance(k, str) and SALTED_KEY_HASH.match(k)]
        if hashes:
            out[str(tenant)] = hashes
    return out


def condition_of(resolved: Resolved, secret: str, ready: int) -> dict:
    if not resolved.problems:
        return S.condition(CONDITION, True, "Rendered",
                           f"{len(resolved.entries)} tenant(s) in Secret {secret}; limits divided over "
                           f"{max(1, ready)} engine pod(s) ({ready} ready)")
    message = "; ".join(f"tenant {p.tenant!r}: {p.message}" for p in resolved.problems)
    if resolved.kept:
        message += f". Kept their previous keys: {', '.join(resolved.kept)}"
    if resolved.locked:
        message += f". No keys (no access) until fixed: {', '.join(resolved.locked)}"
    return S.condition(CONDITION, False, resolved.problems[0].reason, message)


def _owned_by(body: dict, uid: str | None) -> bool:
    return not uid or any(o.get("uid") == uid for o in (body.get("metadata") or {}).get("ownerReferences") or [])


async def _render(rt: Runtime, base: dict, tenants: list[dict], ready: int) -> dict:
    """Read the refs and the Secret written before, write the new one when it differs."""
    meta = base["metadata"]
    ns, name = meta["namespace"], meta["name"]
    secret_name = C.api_keys_secret_name(name)
    live = await rt.kube.get(Ref("v1", "secrets", ns, secret_name))
    if live is not None and not _owned_by(live, meta.get("uid")):
        return S.condition(CONDITION, False, "SecretConflict", f"Secret {secret_name} exists and is not owned by "
                           "this BaseModelDeployment: not overwritten (rename or remove it)")
    refs = sorted({r.name for t in tenants for r in A.secret_key_refs(t.get("apiKeySecretRefs"))})
    limit = asyncio.Semaphore(rt.config.status_concurrency)  # reads in flight at once

    async def read(ref: str) -> tuple[str, dict | None]:
        async with limit:
            return ref, await rt.get_secret(ns, ref)
    secrets = dict(await asyncio.gather(*(read(r) for r in refs)))
    resolved = resolve(tenants, secrets, A.tenant_salt(ns, name), ready, previous_entries(live))
    desired = render.render_api_keys_secret(base, keys_file(resolved.entries), max(1, ready))
    try:
        result = await apply.ensure(rt.kube, desired, live)
    except limits.ObjectTooLarge as e:
        return S.condition(CONDITION, False, "TooLarge", f"{e}: not written, the engines keep the previous "
                           "file (fewer keys per tenant, or fewer tenants)")
    await announce(rt, base, desired, result)
    return condition_of(resolved, secret_name, ready)


async def ensure_api_keys(rt: Runtime, base: dict, pods: list[S.PodView]) -> dict | None:
    """Render the base's API keys Secret when its inputs changed; the TenantsReady condition
    (None: no tenants declared, or a spec the pod policy refuses, which gets nothing applied).
    Without tenants nothing is rendered; a Secret rendered before is left to the garbage
    collector (the engines no longer mount it), so the operator needs no delete on Secrets."""
    meta = base["metadata"]
    key = Key(meta["namespace"], meta["name"])
    spec = base.get("spec") or {}
    tenants = list(spec.get("tenants") or [])
    if not tenants:
        rt.tenants.last.pop(key, None)
        return None
    try:
        render.check_spec(spec, rt.engine_images)
    except ValueError:
        return None
    ready = sum(1 for p in pods if p.target)
    # The Secret cache's epoch: a fixed or rotated ref is read again once per resync interval,
    # which also repairs drift of the rendered Secret.
    stamp = (apply.canonical(tenants), meta.get("uid"), ready, int(time.monotonic() // rt.secret_ttl))
    last = rt.tenants.last.get(key)
    if last is not None and last.stamp == stamp:
        return last.condition
    try:
        condition = await _render(rt, base, tenants, ready)
    except ApiError as e:  # not remembered: the next pass tries again (the client retried already)
        return S.condition(CONDITION, "Unknown", "ApiError", f"the API keys Secret was not rendered: {e}")
    rt.tenants.last[key] = Outcome(stamp, condition)
    return condition
