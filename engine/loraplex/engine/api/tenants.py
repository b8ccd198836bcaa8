"""Tenants: who a request belongs to, and each tenant's settings (fair-share weight, quotas).

The API keys file (`--api-keys-file`) maps a tenant name to its keys, in either of two forms,
mixed freely in one file:

    {"tenant-a": ["sk-a1", "pbkdf2_sha256$..."],                       # the original form
     "tenant-b": {"keys": ["sha256:<64 hex>"], "weight": 2,
                  "limits": {"requests_per_minute": 600, "tokens_per_minute": 200000,
                             "max_concurrent": 16}}}

In the object form only `keys` is required; `weight` (a number > 0, default 1) and each limit
(a positive integer, or null: no limit) are optional. Unknown fields are refused by name, so a
typo never silently turns a quota off.

Tenant names: the keyed tenant's name from the file; without a keys file, the value of the
Gateway API Inference Extension's fairness header (`x-gateway-inference-fairness-id`) when an
inference gateway sends one, else `default`. The admin token's requests belong to `admin`,
which is why a keys file may not name a tenant `admin`.
"""
from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass, field

from loraplex.manifest import SHA256_HEX, KeyIndex, hash_api_key

DEFAULT_TENANT = "default"  # requests without a key, on a server without a keys file
ADMIN_TENANT = "admin"  # requests made with the admin token
GATEWAY_TENANT_HEADER = "x-gateway-inference-fairness-id"
MAX_TENANT_NAME = 128  # characters; a name is a metric label value and a usage-log field

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent")
TENANT_FIELDS = ("keys", "weight", "limits")


@dataclass(frozen=True)
class TenantLimits:
    """Quotas of one tenant; None: no limit (quotas.py enforces them)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + max output at admission, settled with actual usage
    max_concurrent: int | None = None  # requests admitted and not finished

    def any(self) -> bool:
        return any(getattr(self, f) is not None for f in LIMIT_FIELDS)


@dataclass(frozen=True)
class TenantSettings:
    weight: float = 1.0  # share of the engine under contention, relative to other tenants
    limits: TenantLimits = field(default_factory=TenantLimits)


UNLIMITED = TenantSettings()


class TenantTable:
    """A parsed keys file: key hash -> tenant (`get`, `in`, as KeyIndex) and tenant -> settings."""

    def __init__(self, keys: KeyIndex, settings: dict[str, TenantSettings]):
        self.keys = keys
        self.settings = settings

    def get(self, digest: str | None) -> str | None:
        return self.keys.get(digest)

    def __contains__(self, digest: str | None) -> bool:
        return digest in self.keys

    def settings_of(self, tenant: str) -> TenantSettings:
        return self.settings.get(tenant, UNLIMITED)


def check_tenant_name(name: object, where: str) -> str:
    """A tenant name, or ValueError: 1 to 128 characters, no control characters, no space at
    either end (it becomes a Prometheus label value and a usage-log field)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a tenant name must be a non-empty string")
    if len(name) > MAX_TENANT_NAME:
        raise ValueError(f"{where}: tenant name {name[:32]!r}... is longer than {MAX_TENANT_NAME} characters")
    if name != name.strip() or any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise ValueError(f"{where}: tenant name {name!r} has control characters or spaces at an end")
    return name


def tenant_from_gateway(value: str | None) -> str:
    """The tenant named by the fairness header (no header, or an empty one: `default`).
    ValueError for a value that is not 1-128 printable ASCII characters, or names `admin`."""
    if value is None or not value.strip():
        return DEFAULT_TENANT
    name = value.strip()
    if len(name) > MAX_TENANT_NAME:
        raise ValueError(f"the {GATEWAY_TENANT_HEADER} header is longer than {MAX_TENANT_NAME} characters")
    if not all(" " <= c <= "~" for c in name):
        raise ValueError(f"the {GATEWAY_TENANT_HEADER} header must hold printable ASCII characters only")
    if name == ADMIN_TENANT:
        raise ValueError(f"the {GATEWAY_TENANT_HEADER} header may not name the tenant {ADMIN_TENANT!r} (reserved "
                         "for the admin token)")
    return name


def _positive_int(value: object, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive integer or null, got {json.dumps(value)}")
    return value


def _weight(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be a number > 0, got {json.dumps(value)}")
    return float(value)


def _unknown(data: dict, known: tuple[str, ...], where: str) -> None:
    extra = sorted(set(data) - set(known))
    if extra:
        raise ValueError(f"{where}: unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                         f"(allowed: {', '.join(known)})")


def parse_limits(data: object, where: str) -> TenantLimits:
    if data is None:
        return TenantLimits()
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object {{{', '.join(LIMIT_FIELDS)}}}")
    _unknown(data, LIMIT_FIELDS, where)
    return TenantLimits(**{f: _positive_int(data.get(f), f"{where}.{f}") for f in LIMIT_FIELDS})


def _parse_entry(tenant: str, value: object) -> tuple[list[str], TenantSettings]:
    """One tenant's value: a key, a list of keys, or {keys, weight?, limits?}."""
    where = f"tenant {tenant!r}"
    settings = UNLIMITED
    if isinstance(value, dict):
        _unknown(value, TENANT_FIELDS, where)
        if "keys" not in value:
            raise ValueError(f"{where}: 'keys' is required (a key or a list of keys)")
        settings = TenantSettings(weight=_weight(value.get("weight", 1), f"{where}: weight"),
                                  limits=parse_limits(value.get("limits"), f"{where}: limits"))
        value = value["keys"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value):
        raise ValueError(f"{where}: keys must be a non-empty string or a list of them")
    return value, settings


def _key_entry(tenant: str, key: str) -> str:
    """What the index stores for a key as written in the file."""
    if key.startswith("pbkdf2_sha256$"):
        return key
    if key.startswith("sha256:"):
        entry = key[len("sha256:"):].lower()
        if not SHA256_HEX.match(entry):
            raise ValueError(f"tenant {tenant!r}: 'sha256:' must be followed by 64 hex characters")
        return entry
    return hash_api_key(key)


def parse_tenants(text: str) -> TenantTable:
    """Parse a keys file (both forms). Raises ValueError with a clear message on a malformed file."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the API keys file is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError('the API keys file must hold a JSON object {"tenant": ["key", ...]} or '
                         '{"tenant": {"keys": [...], "weight": 1, "limits": {...}}}')
    index = KeyIndex()
    settings: dict[str, TenantSettings] = {}
    for tenant, value in data.items():
        check_tenant_name(tenant, "the API keys file")
        if tenant == ADMIN_TENANT:
            raise ValueError(f"the API keys file may not name a tenant {ADMIN_TENANT!r}: that name is reserved for "
                             "the admin token's requests")
        keys, settings[tenant] = _parse_entry(tenant, value)
        for key in keys:
            entry = _key_entry(tenant, key)
            try:
                other = index.add(entry, tenant)
            except ValueError:
                raise ValueError(f"tenant {tenant!r}: a 'pbkdf2_sha256$' key must be pbkdf2_sha256$<iterations "
                                 "1..1000000>$<salt: 8-64 of A-Za-z0-9._->$<64 hex>") from None
            if other is not None and other != tenant:
                raise ValueError(f"one key is listed for two tenants ({other!r} and {tenant!r})")
    return TenantTable(index, settings)
