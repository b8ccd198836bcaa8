"""The operator's own Kubernetes reads and writes, over kubernetes_asyncio's ApiClient.

kopf watches and calls the handlers; this module does everything else the operator asks of the
API server. The library brings the credentials (its in-cluster and kubeconfig loaders: service
account token refresh, exec plugins, client certificates), TLS, the aiohttp connection pool and
request building. What the library does not do, and this module adds:
- retries of the API server's transient trouble (429, 5xx, a dropped connection) with backoff,
  honouring Retry-After (kubernetes_asyncio retries nothing);
- plain dicts both ways: every call asks for the raw response (`_preload_content=False`) and
  decodes it with json.loads, never into the typed models. The operator works on dicts (kopf's
  bodies, the rendered manifests), and model deserialization of a large list costs about 40 times
  the JSON decoding (docs/operator.md, "Kubernetes client");
- one way to name an object (`Ref`) for built-in kinds and CRs alike, so every call takes the
  same path: ApiClient.call_api on the object's REST path.
It only ever creates (POST), merge- or JSON-patches (PATCH) and deletes: no PUT (replace) and no
server-side apply (see apply.py), so nothing the operator does can clobber fields that others
(users, GitOps, the API server) set. Status is written only through the status subresource.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.config import ConfigException

from . import backoff

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
FIELD_MANAGER = "loraplex-operator"

__all__ = ["ApiError", "ConfigException", "JSON_PATCH", "KubeClient", "MERGE_PATCH", "Ref", "load_configuration"]


class ApiError(k8s.ApiException):
    """The library's ApiException, with the API server's Status message and reason parsed out."""

    def __init__(self, status: int, message: str, reason: str = "", headers: Any = None, body: str | None = None):
        super().__init__(status=status, reason=reason)
        self.message = message
        self.headers = headers
        self.body = body

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}".strip()


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


async def load_configuration() -> k8s.Configuration:
    """Credentials as kubectl and client-go find them: the pod's service account when in a
    cluster, else the kubeconfig ($KUBECONFIG or ~/.kube/config, current context). The in-cluster
    configuration re-reads its token file as the kubelet rotates it. Raises ConfigException."""
    cfg = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=cfg)
    except ConfigException:
        # $KUBECONFIG read now (the library reads it once, at its import); persist_config=False:
        # never write refreshed provider tokens back into the user's file.
        path = os.environ.get("KUBECONFIG") or "~/.kube/config"
        await k8s_config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
    return cfg


class KubeClient:
    """Namespaced CRUD over the Kubernetes REST API, with retries, on a kubernetes_asyncio ApiClient."""

    RETRIES = 4
    RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
    BACKOFF_BASE, BACKOFF_MAX, RETRY_AFTER_MAX = 0.2, 10.0, 60.0

    def __init__(self, configuration: k8s.Configuration, *, timeout: float = 30.0):
        self.api = k8s.ApiClient(configuration)
        self.api.user_agent = FIELD_MANAGER
        # Per socket operation, not per call: a list of 10,000 objects may take longer than one
        # read, but a server that goes silent for `timeout` is given up on (and retried).
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)

    @classmethod
    def for_server(cls, server: str, *, token: str | None = None, **kwargs: Any) -> "KubeClient":
        """A client for a plain URL (tests, local tools), optionally with a bearer token."""
        cfg = k8s.Configuration(host=server.rstrip("/"))
        if token:
            cfg.api_key["BearerToken"] = f"Bearer {token}"
        return cls(cfg, **kwargs)

    async def aclose(self) -> None:
        await self.api.close()

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), self.RETRY_AFTER_MAX)
            except ValueError:
                pass  # an HTTP date: rare from an API server; fall back to our own backoff
        return backoff.jittered(backoff.exponential(attempt + 1, self.BACKOFF_BASE, self.BACKOFF_MAX))

    async def _request(self, method: str, path: str, *, body: Any = None, content_type: str | None = None,
                       params: dict[str, str] | None = None) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type or "application/json"}
        query = list(params.items()) if params else None
        # The API server's own transient trouble (429 throttling, 5xx, a dropped connection) is
        # retried here with backoff, honouring Retry-After; anything else is the caller's (a 409
        # means the caller's view is stale: it re-reads, see apply.ensure and lease.py).
        for attempt in range(self.RETRIES + 1):
            try:
                resp = await self.api.call_api(
                    path, method, query_params=query, header_params=dict(headers), body=body,
                    auth_settings=["BearerToken"], _preload_content=False, _request_timeout=self._timeout)
                try:
                    status, data, resp_headers = resp.status, await resp.read(), resp.headers
                finally:
                    resp.release()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                if attempt == self.RETRIES:
                    raise ApiError(503, f"{method} {path}: {type(e).__name__}: {e}", "Unreachable") from e
                await asyncio.sleep(self._backoff(attempt, None))
                continue
            if status in self.RETRY_STATUSES and attempt < self.RETRIES:
                await asyncio.sleep(self._backoff(attempt, resp_headers.get("Retry-After")))
                continue
            break
        if status >= 400:
            text = data.decode(errors="replace")
            try:
                payload = json.loads(data)
                message, reason = payload.get("message", text), payload.get("reason", "")
            except (ValueError, AttributeError):
                message, reason = text, ""
            raise ApiError(status, str(message)[:2000], str(reason), headers=resp_headers, body=text[:2000])
        return json.loads(data) if data else None

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
        return await self._request("POST", collection.path(), body=body, params={"fieldManager": FIELD_MANAGER})

    async def patch(self, ref: Ref, patch: Any, *, subresource: str | None = None,
                    content_type: str = MERGE_PATCH) -> dict:
        return await self._request("PATCH", ref.path(subresource), body=patch, content_type=content_type,
                                   params={"fieldManager": FIELD_MANAGER})

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
                         component: str = FIELD_MANAGER) -> None:
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
