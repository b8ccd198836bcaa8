"""A small async Kubernetes API client over httpx.

kopf watches and calls the handlers; this client does the operator's own reads and writes. It
only ever creates (POST), merge-patches (PATCH) and deletes: no PUT (replace) anywhere, so
nothing the operator does can clobber fields that others (users, GitOps, the API server) set.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import random
import ssl
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = ""):
        super().__init__(f"{status} {reason}: {message}".strip())
        self.status = status
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class Ref:
    """Where an object lives in the API: apiVersion + plural + namespace + name."""

    api_version: str
    plural: str
    namespace: str | None = None
    name: str | None = None

    def path(self, subresource: str | None = None) -> str:
        root = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        ns = f"/namespaces/{self.namespace}" if self.namespace else ""
        p = f"{root}{ns}/{self.plural}"
        if self.name:
            p += f"/{self.name}"
            if subresource:
                p += f"/{subresource}"
        return p


def _tls_context(info: Any) -> ssl.SSLContext | bool:
    if getattr(info, "insecure", None):
        return False
    ctx = ssl.create_default_context()
    if getattr(info, "ca_path", None):
        ctx.load_verify_locations(cafile=os.fspath(info.ca_path))
    elif getattr(info, "ca_data", None):
        data = info.ca_data
        data = data.decode() if isinstance(data, bytes) else data
        try:  # kubeconfig carries base64 of PEM; kopf may already have decoded it
            data = base64.b64decode(data, validate=True).decode()
        except Exception:
            pass
        ctx.load_verify_locations(cadata=data)
    cert = getattr(info, "certificate_path", None)
    key = getattr(info, "private_key_path", None)
    cert_data = getattr(info, "certificate_data", None)
    key_data = getattr(info, "private_key_data", None)
    if cert_data and key_data:
        # ssl wants files: write them once, private to this process.
        d = tempfile.mkdtemp(prefix="loraplex-op-")
        cert, key = os.path.join(d, "tls.crt"), os.path.join(d, "tls.key")
        for path, blob in ((cert, cert_data), (key, key_data)):
            blob = blob.encode() if isinstance(blob, str) else blob
            try:
                blob = base64.b64decode(blob, validate=True)
            except Exception:
                pass
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
    if cert and key:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    return ctx


class KubeClient:
    """Namespaced CRUD over the Kubernetes REST API with the credentials kopf logged in with."""

    def __init__(self, server: str, *, token: str | None = None, verify: ssl.SSLContext | bool = True,
                 username: str | None = None, password: str | None = None, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        headers = {"Accept": "application/json", "User-Agent": "loraplex-operator"}
        auth = None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif username and password:
            auth = httpx.BasicAuth(username, password)
        self._http = httpx.AsyncClient(base_url=server.rstrip("/"), headers=headers, verify=verify,
                                       auth=auth, timeout=timeout, transport=transport)

    RETRIES = 4
    RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
    BACKOFF_BASE, BACKOFF_MAX = 0.2, 10.0

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), 60.0)
            except ValueError:
                pass
        return min(self.BACKOFF_BASE * 2 ** attempt, self.BACKOFF_MAX) * (0.5 + random.random() / 2)

    @classmethod
    def from_connection_info(cls, info: Any) -> "KubeClient":
        return cls(info.server, token=getattr(info, "token", None), verify=_tls_context(info),
                   username=getattr(info, "username", None), password=getattr(info, "password", None))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, body: Any = None, content_type: str | None = None,
                       params: dict[str, str] | None = None) -> Any:
        headers = {}
        content = None
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = content_type or "application/json"
        # The API server's own transient trouble (429 throttling, 5xx, a dropped connection) is
        # retried here with backoff, honouring Retry-After; anything else is the caller's.
        for attempt in range(self.RETRIES + 1):
            try:
                resp = await self._http.request(method, path, content=content, headers=headers, params=params)
            except httpx.TransportError as e:
                if attempt == self.RETRIES:
                    raise ApiError(503, f"{method} {path}: {type(e).__name__}: {e}", "Unreachable") from e
                await asyncio.sleep(self._backoff(attempt, None))
                continue
            if resp.status_code in self.RETRY_STATUSES and attempt < self.RETRIES:
                await asyncio.sleep(self._backoff(attempt, resp.headers.get("Retry-After")))
                continue
            break
        if resp.status_code >= 400:
            try:
                payload = resp.json()
                message, reason = payload.get("message", resp.text), payload.get("reason", "")
            except ValueError:
                message, reason = resp.text, ""
            raise ApiError(resp.status_code, str(message)[:2000], str(reason))
        if not resp.content:
            return None
        return resp.json()

    async def get(self, ref: Ref, subresource: str | None = None) -> dict | None:
        """The object, or None when it does not exist."""
        try:
            return await self._request("GET", ref.path(subresource))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, ref: Ref, label_selector: str | None = None) -> list[dict]:
        params = {"labelSelector": label_selector} if label_selector else None
        data = await self._request("GET", ref.path(), params=params)
        return list((data or {}).get("items") or [])

    async def has_resource(self, api_version: str, plural: str) -> bool:
        """API discovery: whether the server serves `plural` in `api_version` (a CRD installed)."""
        root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        try:
            data = await self._request("GET", root)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in (data or {}).get("resources") or [])

    async def create(self, ref: Ref, body: dict) -> dict:
        collection = Ref(ref.api_version, ref.plural, ref.namespace)
        return await self._request("POST", collection.path(), body=body,
                                   params={"fieldManager": "loraplex-operator"})

    async def patch(self, ref: Ref, patch: Any, *, subresource: str | None = None,
                    content_type: str = MERGE_PATCH) -> dict:
        return await self._request("PATCH", ref.path(subresource), body=patch, content_type=content_type,
                                   params={"fieldManager": "loraplex-operator"})

    async def patch_status(self, ref: Ref, status_patch: dict) -> dict:
        return await self.patch(ref, {"status": status_patch}, subresource="status")

    async def delete(self, ref: Ref) -> bool:
        """True when deleted (or deletion started), False when it was not there."""
        try:
            await self._request("DELETE", ref.path())
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    async def post_event(self, involved: dict, *, type: str, reason: str, message: str,
                         component: str = "loraplex-operator") -> None:
        """A core/v1 Event about `involved` (a full object body or an object reference)."""
        meta = involved.get("metadata", involved)
        namespace = meta.get("namespace") or "default"
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        # Named as client-go names them (<object>.<unique>), never generateName: some API
        # emulators do not implement generateName, and a name is cheap to make unique.
        name = f"{meta.get('name', 'object')}.{uuid.uuid4().hex[:16]}"
        ref = {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta.get("name"),
            "namespace": namespace,
            "uid": meta.get("uid"),
        }
        ref = {k: v for k, v in ref.items() if v}
        if len(message) > 1024:
            message = message[:1000] + " ... " + message[-19:]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": ref,
            "type": type,
            "reason": reason,
            "message": message,
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": os.environ.get("HOSTNAME", component),
            "action": reason,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "eventTime": now,
            "count": 1,
        }
        await self.create(Ref("v1", "events", namespace), body)
