"""API keys (tenants) and the admin token.

API keys file (`--api-keys-file`), JSON: tenant name -> list of keys (or one key):
    {"tenant-a": ["sk-a1", "sk-a2"], "tenant-b": "sk-b1", "tenant-c": ["sha256:<64 hex>"]}
A value `sha256:<hex>` is a key's digest (loraplex.manifest.hash_api_key), so the file need not
hold raw keys. Only digests are kept in memory. With the file set, every inference route needs
`Authorization: Bearer <key>`. An adapter's manifest `tenants` (key digests) restricts it further.

Admin token file (`--admin-token-file`): the token on its first line. With it set, admin routes
need `Authorization: Bearer <admin token>` (compared in constant time). The admin token is also
accepted on inference routes and may call every adapter.

Both files are re-read when they change (Kubernetes Secret updates), by the app's watcher.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from loraplex.engine.api.errors import APIError
from loraplex.manifest import SHA256_HEX, AdapterManifest, hash_api_key

log = logging.getLogger("loraplex.engine.api.auth")


@dataclass(frozen=True)
class Principal:
    tenant: str | None = None  # None: no keys file, or the admin
    key_hash: str | None = None  # sha256 of the presented bearer token, if any
    is_admin: bool = False


def bearer_token(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def parse_api_keys(text: str) -> dict[str, str]:
    """Key digest -> tenant. Raises ValueError with a clear message on a malformed file."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the API keys file is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError('the API keys file must hold a JSON object {"tenant": ["key", ...]}')
    by_hash: dict[str, str] = {}
    for tenant, keys in data.items():
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"tenant {tenant!r}: keys must be a non-empty string or a list of them")
        for key in keys:
            if key.startswith("sha256:"):
                digest = key[len("sha256:"):].lower()
                if not SHA256_HEX.match(digest):
                    raise ValueError(f"tenant {tenant!r}: 'sha256:' must be followed by 64 hex characters")
            else:
                digest = hash_api_key(key)
            other = by_hash.get(digest)
            if other is not None and other != tenant:
                raise ValueError(f"one key is listed for two tenants ({other!r} and {tenant!r})")
            by_hash[digest] = tenant
    return by_hash


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


def _parse_token(text: str) -> str:
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ValueError("the admin token file is empty")
    return token


class Authenticator:
    def __init__(self, api_keys_file: str | None = None, admin_token_file: str | None = None):
        self.keys = WatchedFile(api_keys_file, parse_api_keys) if api_keys_file else None
        self.admin = WatchedFile(admin_token_file, _parse_token) if admin_token_file else None
        if self.admin is None:
            log.warning("no --admin-token-file: the adapter admin routes are open to every caller")

    def reload(self) -> None:
        for f in (self.keys, self.admin):
            if f is not None and f.reload():
                log.info("reloaded %s", f.path)

    def _is_admin_token(self, token: str | None) -> bool:
        return bool(token) and self.admin is not None and hmac.compare_digest(
            token.encode(), self.admin.value.encode())

    def inference(self, request: Request) -> Principal:
        """Who calls an inference route. 401 when keys are required and the key is missing/unknown."""
        token = bearer_token(request)
        if self._is_admin_token(token):
            return Principal(key_hash=hash_api_key(token), is_admin=True)
        digest = hash_api_key(token) if token else None
        if self.keys is None:
            return Principal(key_hash=digest)
        if digest is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        tenant = self.keys.value.get(digest)
        if tenant is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return Principal(tenant=tenant, key_hash=digest)

    def require_admin(self, request: Request) -> Principal:
        token = bearer_token(request)
        if self.admin is None:
            return Principal(key_hash=hash_api_key(token) if token else None, is_admin=True)
        if token is None:
            raise APIError(401, "this route needs the admin token: send 'Authorization: Bearer <token>'",
                           code="missing_admin_token")
        if self._is_admin_token(token):
            return Principal(key_hash=hash_api_key(token), is_admin=True)
        if self.keys is not None and hash_api_key(token) in self.keys.value:
            raise APIError(403, "API keys cannot call admin routes", code="forbidden")
        raise APIError(401, "invalid admin token", code="invalid_admin_token")

    def may_register(self, principal: Principal) -> bool:
        """On-the-fly adapter registration (LoRAX adapter_source): admins, or all when no token is set."""
        return self.admin is None or principal.is_admin

    @staticmethod
    def may_use(principal: Principal, manifest: AdapterManifest) -> bool:
        return not manifest.tenants or principal.is_admin or principal.key_hash in manifest.tenants

    @staticmethod
    def check_adapter(principal: Principal, manifest: AdapterManifest) -> None:
        """401 without a key, 403 with a key the adapter does not list (and nothing more)."""
        if Authenticator.may_use(principal, manifest):
            return
        if principal.key_hash is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        raise APIError(403, f"this API key may not call the model {manifest.name!r}", code="forbidden", param="model")
