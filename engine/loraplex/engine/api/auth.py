"""API keys (tenants) and the admin token.

API keys file (`--api-keys-file`), JSON: tenant name -> list of keys (or one key), or an object
with the keys and the tenant's weight and quotas (tenants.py has the format):
    {"tenant-a": ["sk-a1", "sk-a2"], "tenant-b": "sk-b1",
     "tenant-c": ["pbkdf2_sha256$1000$<salt>$<64 hex>", "sha256:<64 hex>"],
     "tenant-d": {"keys": ["sk-d1"], "weight": 2, "limits": {"requests_per_minute": 600}}}
A `pbkdf2_sha256$...` value is a key's salted hash (loraplex.manifest.salted_key_hash), so the
file need not hold raw keys; `sha256:<hex>` (an unsalted digest) is still read, deprecated.
Only hashes are kept in memory. With the file set, every inference route needs
`Authorization: Bearer <key>`. An adapter's manifest `tenants` (key hashes) restricts it further;
to a caller whose key it does not list, such an adapter does not exist (404, as unknown names).

Admin token file (`--admin-token-file`): the token on its first line. With it set, admin routes
need `Authorization: Bearer <admin token>` (compared in constant time). The admin token is also
accepted on inference routes and may call every adapter.

Metrics token file (`--metrics-token-file`), the token on its first line: a read-only
credential for scrapers. With it (or the admin token) as a bearer token, /metrics, /info and
/ready name restricted adapters; without, they show them by opaque ids (redaction.py).

Every caller has a tenant (`Principal.tenant`): the key's tenant; the admin token's requests are
`admin`'s; without a keys file, the tenant an inference gateway names in
`x-gateway-inference-fairness-id`, else `default`.

The files are re-read when they change (Kubernetes Secret updates), by the app's watcher.
"""
from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from loraplex.engine.api.errors import APIError
from loraplex.engine.api.tenants import (ADMIN_TENANT, DEFAULT_TENANT, GATEWAY_TENANT_HEADER, UNLIMITED, TenantSettings,
                                         TenantTable, parse_tenants, tenant_from_gateway)
from loraplex.engine.core.errors import UnknownAdapterError
from loraplex.manifest import AdapterManifest, hash_api_key, key_matches

log = logging.getLogger("loraplex.engine.api.auth")


@dataclass(frozen=True)
class Principal:
    tenant: str = DEFAULT_TENANT  # always set: see the module's docstring
    key_hash: str | None = None  # sha256 of the presented bearer token, if any
    is_admin: bool = False
    settings: TenantSettings = UNLIMITED  # the tenant's weight and quotas when the request came in


def bearer_token(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def parse_api_keys(text: str) -> TenantTable:
    """Key hash -> tenant (`.get(digest)`), and tenant -> settings. Raises ValueError with a clear
    message on a malformed file."""
    return parse_tenants(text)


class WatchedFile:
    """A small file re-read when its stat signature changes; keeps the last good value."""

    def __init__(self, path: str, parse):
        self.path = Path(path)
        self.parse = parse
        self._sig = None
        self.value = None
        self.reload(strict=True)

    def _signature(self):
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, strict: bool = False) -> bool:
        """True when a new version was loaded. A bad or missing file keeps the last good value
        (at start-up, `strict`, it raises ValueError instead). Each bad version is logged once."""
        try:
            sig = self._signature()
        except OSError as exc:
            if strict:
                raise ValueError(f"{self.path}: {exc}") from None
            if self._sig != "missing":
                log.error("keeping the previous contents of %s: %s", self.path, exc)
                self._sig = "missing"
            return False
        if sig == self._sig:
            return False
        try:
            value = self.parse(self.path.read_text())
        except (OSError, ValueError) as exc:
            if strict:
                raise ValueError(f"{self.path}: {exc}") from None
            log.error("keeping the previous contents of %s: %s", self.path, exc)
            self._sig = sig
            return False
        self._sig, self.value = sig, value
        return True


def _same(token: str | None, file: WatchedFile | None) -> bool:
    """The token equals the file's (constant-time comparison)."""
    return bool(token) and file is not None and hmac.compare_digest(token.encode(), file.value.encode())


def _parse_token(text: str) -> str:
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ValueError("the admin token file is empty")
    return token


class Authenticator:
    def __init__(self, api_keys_file: str | None = None, admin_token_file: str | None = None,
                 metrics_token_file: str | None = None):
        self.keys = WatchedFile(api_keys_file, parse_api_keys) if api_keys_file else None
        self.admin = WatchedFile(admin_token_file, _parse_token) if admin_token_file else None
        self.metrics = WatchedFile(metrics_token_file, _parse_token) if metrics_token_file else None
        if self.admin is None:
            log.warning("no --admin-token-file: the adapter admin routes are open to every caller")

    def reload(self) -> None:
        for f in (self.keys, self.admin, self.metrics):
            if f is not None and f.reload():
                log.info("reloaded %s", f.path)

    def _is_admin_token(self, token: str | None) -> bool:
        return _same(token, self.admin)

    def may_see_names(self, request: Request) -> bool:
        """Whether the caller of /metrics, /info or /ready sees restricted adapters' names: it
        presents the admin or the metrics token (a server without an admin token has no
        restricted names to hide from its open admin routes either)."""
        token = bearer_token(request)
        return self.admin is None or _same(token, self.admin) or _same(token, self.metrics)

    def inference(self, request: Request) -> Principal:
        """Who calls an inference route. 401 when keys are required and the key is missing/unknown."""
        token = bearer_token(request)
        if self._is_admin_token(token):
            return Principal(tenant=ADMIN_TENANT, key_hash=hash_api_key(token), is_admin=True)
        digest = hash_api_key(token) if token else None
        if self.keys is None:
            return Principal(tenant=self._gateway_tenant(request), key_hash=digest)
        if digest is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        table: TenantTable = self.keys.value
        tenant = table.get(digest)
        if tenant is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return Principal(tenant=tenant, key_hash=digest, settings=table.settings_of(tenant))

    @staticmethod
    def _gateway_tenant(request: Request) -> str:
        """Without a keys file, an inference gateway in front names the tenant (its fairness id).
        With keys, the header is ignored: the key decides."""
        try:
            return tenant_from_gateway(request.headers.get(GATEWAY_TENANT_HEADER))
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_tenant") from None

    def tenants(self) -> dict[str, TenantSettings]:
        """The tenants the keys file names, with their settings (empty without a keys file)."""
        return {} if self.keys is None else dict(self.keys.value.settings)

    def is_configured(self, tenant: str) -> bool:
        return self.keys is not None and tenant in self.keys.value.settings

    def require_admin(self, request: Request) -> Principal:
        token = bearer_token(request)
        if self.admin is None:
            return Principal(tenant=ADMIN_TENANT, key_hash=hash_api_key(token) if token else None, is_admin=True)
        if token is None:
            raise APIError(401, "this route needs the admin token: send 'Authorization: Bearer <token>'",
                           code="missing_admin_token")
        if self._is_admin_token(token):
            return Principal(tenant=ADMIN_TENANT, key_hash=hash_api_key(token), is_admin=True)
        if self.keys is not None and hash_api_key(token) in self.keys.value:
            raise APIError(403, "API keys cannot call admin routes", code="forbidden")
        raise APIError(401, "invalid admin token", code="invalid_admin_token")

    def may_register(self, principal: Principal) -> bool:
        """On-the-fly adapter registration (LoRAX adapter_source): admins, or all when no token is set."""
        return self.admin is None or principal.is_admin

    @staticmethod
    def may_see(principal: Principal, tenants: list[str]) -> bool:
        """Whether an adapter restricted to `tenants` (none: open) exists for this caller."""
        return not tenants or principal.is_admin or key_matches(principal.key_hash, tenants)

    @staticmethod
    def may_use(principal: Principal, manifest: AdapterManifest) -> bool:
        return Authenticator.may_see(principal, manifest.tenants)

    @staticmethod
    def check_adapter(principal: Principal, manifest: AdapterManifest, model: str | None = None,
                      param: str = "model") -> None:
        """An adapter the caller may not use answers as a name that does not exist (404, the
        message and code of an unknown model): neither its name nor its existence leaks to
        other tenants, with a key or without one. `model`: the name as requested."""
        if not Authenticator.may_use(principal, manifest):
            raise UnknownAdapterError(f"the model {model or manifest.name!r} does not exist", param=param)
