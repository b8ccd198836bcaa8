"""An in-memory Kubernetes API for in-process operator tests, served over HTTP on loopback (aiohttp),
so that the operator's real client (kubernetes_asyncio, operator/loraplex/operator/kube.py) talks to it as to an API
server.

GET, list, POST, merge- and JSON-PATCH (also on /status) and DELETE of namespaced objects, API
discovery, and the API server's size limits, enforced (kmock enforces none): an object whose
annotations exceed 256 KiB, a ConfigMap with 1 MiB of data, a Secret with more than 1 MiB of
(decoded) data or any object over 1.5 MiB is refused
with 422, as a real API server refuses it. It records every request and the largest body of each
kind. `fail(...)` queues answers (429, 5xx, with or without Retry-After) served before the next
requests are handled, to prove the client's retries.
"""
from __future__ import annotations

import copy
import json
from collections import Counter

import aiohttp.web
import jsonpatch

from loraplex.operator.kube import KubeClient

from .sizes import (ANNOTATIONS_LIMIT, CONFIGMAP_DATA_LIMIT, OBJECT_LIMIT, SECRET_DATA_LIMIT, annotation_bytes,
                    data_bytes, object_bytes, secret_data_bytes)

TOKEN = "fake-api-token"


def merge(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def status(code: int, reason: str, message: str = "") -> tuple[int, dict]:
    return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
                  "message": message or reason}


class FakeApi:
    def __init__(self, served: set[str] = frozenset()):
        self.objects: dict[str, dict] = {}      # "/apis/g/v/namespaces/ns/plural/name" -> body
        self.requests: Counter = Counter()      # "METHOD plural[/sub]" -> count
        self.content_types: Counter = Counter()  # "METHOD content-type" of the requests with a body
        self.queries: Counter = Counter()       # "METHOD key=value" of the query parameters
        self.received = 0                       # every request, the failed ones included
        self.largest: dict[str, int] = {}       # kind -> largest object seen (bytes)
        self.served = set(served)               # "group/version/plural" the discovery reports
        self.faults: list[tuple[int, dict[str, str]]] = []
        self.url = ""
        self._runner: aiohttp.web.AppRunner | None = None

    # --- serving ------------------------------------------------------------------------------
    async def start(self) -> str:
        if self._runner is None:
            app = aiohttp.web.Application(client_max_size=16 * 2**20)
            app.router.add_route("*", "/{path:.*}", self._serve)
            self._runner = aiohttp.web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.url = "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.url

    async def client(self, **kwargs) -> KubeClient:
        """The operator's client, pointed at this API (started on first use)."""
        return KubeClient.for_server(await self.start(), token=TOKEN, **kwargs)

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def fail(self, code: int, times: int = 1, retry_after: str | None = None) -> None:
        """Answer the next `times` requests with `code` (and Retry-After when given)."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self.faults += [(code, headers)] * times

    async def _serve(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.received += 1
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            code, payload = status(401, "Unauthorized")
            return aiohttp.web.json_response(payload, status=code)
        if self.faults:
            code, headers = self.faults.pop(0)
            return aiohttp.web.json_response(status(code, "Injected", f"injected {code}")[1], status=code,
                                             headers=headers)
        body = await request.read()
        if body:
            self.content_types[f"{request.method} {request.content_type}"] += 1
        for k, v in request.query.items():
            self.queries[f"{request.method} {k}={v}"] += 1
        code, payload = self.handle(request.method, request.path, json.loads(body) if body else None,
                                    request.content_type)
        return aiohttp.web.Response(body=json.dumps(payload).encode(), status=code, content_type="application/json")

    # --- the API ------------------------------------------------------------------------------
    def _limits(self, obj: dict) -> str | None:
        if annotation_bytes(obj) > ANNOTATIONS_LIMIT:
            return f"metadata.annotations: Too long: must have at most {ANNOTATIONS_LIMIT} bytes"
        if obj.get("kind") == "ConfigMap" and data_bytes(obj) >= CONFIGMAP_DATA_LIMIT:
            return "ConfigMap data too long: must have at most 1048576 bytes"
        if obj.get("kind") == "Secret" and secret_data_bytes(obj) > SECRET_DATA_LIMIT:
            return "Secret data too long: must have at most 1048576 bytes"
        if object_bytes(obj) > OBJECT_LIMIT:
            return "Request entity too large: limit is 3145728"
        kind = obj.get("kind", "?")
        self.largest[kind] = max(self.largest.get(kind, 0), object_bytes(obj))
        return None

    def handle(self, method: str, path: str, body, content_type: str = "") -> tuple[int, dict]:
        parts = path.strip("/").split("/")
        root = 2 if parts[0] == "api" else 3
        if len(parts) == root:  # discovery
            gv = "/".join(parts[1:root])
            res = [{"name": key.rsplit("/", 1)[1]} for key in self.served if key.rsplit("/", 1)[0] == gv]
            return (200, {"resources": res}) if res else status(404, "NotFound")
        rest = parts[root:]
        sub = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, plural, name = rest[1], rest[2], rest[3] if len(rest) > 3 else None
            sub = rest[4] if len(rest) > 4 else None
        else:
            ns, plural, name = None, rest[0], rest[1] if len(rest) > 1 else None
        self.requests[f"{method} {plural}{'/' + sub if sub else ''}"] += 1
        coll = "/" + "/".join(parts[:root] + (["namespaces", ns] if ns else []) + [plural])
        key = f"{coll}/{name}" if name else None
        if method == "GET" and key:
            obj = self.objects.get(key)
            return (200, obj) if obj else status(404, "NotFound", f"{plural} {name!r} not found")
        if method == "GET":  # a list: in one namespace, or of a namespaced kind in all of them
            everywhere = "/" + "/".join(parts[:root]) + "/namespaces/"
            return 200, {"items": [o for k, o in self.objects.items() if k.startswith(coll + "/") or (
                ns is None and k.startswith(everywhere) and k.rsplit("/", 2)[1] == plural)]}
        if method == "POST":
            key = f"{coll}/{body['metadata']['name']}"
            if key in self.objects:
                return status(409, "AlreadyExists", f"{plural} {body['metadata']['name']!r} already exists")
            if (why := self._limits(body)):
                return status(422, "Invalid", why)
            self.objects[key] = body
            return 201, body
        if method == "PATCH":
            if key not in self.objects:
                return status(404, "NotFound", f"{plural} {name!r} not found")
            old = self.objects[key]
            if content_type == "application/json-patch+json":
                try:
                    new = jsonpatch.apply_patch(old, body)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                    return status(422, "Invalid", str(e))
                if sub == "status":
                    new = {**old, "status": new.get("status")}
            elif content_type == "application/merge-patch+json":
                new = merge(old, {"status": body.get("status")} if sub == "status" else body)
            else:
                return status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: "
                              f"accepted media types include: application/json-patch+json, "
                              f"application/merge-patch+json")
            if (why := self._limits(new)):
                return status(422, "Invalid", why)
            self.objects[key] = new
            return 200, new
        if method == "DELETE":
            return (200, {}) if self.objects.pop(key, None) else status(404, "NotFound")
        return status(405, "MethodNotAllowed")

    def put(self, path: str, obj: dict) -> None:
        assert self._limits(obj) is None
        self.objects[path] = obj

    def writes(self) -> int:
        return sum(n for k, n in self.requests.items() if not k.startswith("GET"))
