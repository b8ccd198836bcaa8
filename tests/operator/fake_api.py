"""An in-memory Kubernetes API for in-process operator tests, served through httpx's MockTransport.

GET, list, POST, merge-PATCH (also on /status) and DELETE of namespaced objects, API discovery,
and the API server's size limits, enforced (kmock enforces none): an object whose annotations
exceed 256 KiB, a ConfigMap with 1 MiB of data or any object over 1.5 MiB is refused with 422,
as a real API server refuses it. It records every request and the largest body of each kind.
"""
from __future__ import annotations

import copy
import json
from collections import Counter

import httpx

from .sizes import ANNOTATIONS_LIMIT, CONFIGMAP_DATA_LIMIT, OBJECT_LIMIT, annotation_bytes, data_bytes, object_bytes


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


class FakeApi:
    def __init__(self, served: set[str] = frozenset()):
        self.objects: dict[str, dict] = {}      # "/apis/g/v/namespaces/ns/plural/name" -> body
        self.requests: Counter = Counter()      # "METHOD plural[/sub]" -> count
        self.largest: dict[str, int] = {}       # kind -> largest object seen (bytes)
        self.served = set(served)               # "group/version/plural" the discovery reports

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def _limits(self, obj: dict) -> str | None:
        if annotation_bytes(obj) > ANNOTATIONS_LIMIT:
            return f"metadata.annotations: Too long: must have at most {ANNOTATIONS_LIMIT} bytes"
        if obj.get("kind") == "ConfigMap" and data_bytes(obj) >= CONFIGMAP_DATA_LIMIT:
            return "ConfigMap data too long: must have at most 1048576 bytes"
        if object_bytes(obj) > OBJECT_LIMIT:
            return "Request entity too large: limit is 3145728"
        kind = obj.get("kind", "?")
        self.largest[kind] = max(self.largest.get(kind, 0), object_bytes(obj))
        return None

    def handle(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.strip("/").split("/")
        method = request.method
        root = 2 if parts[0] == "api" else 3
        if len(parts) == root:  # discovery
            gv = "/".join(parts[1:root])
            res = [{"name": key.rsplit("/", 1)[1]} for key in self.served if key.rsplit("/", 1)[0] == gv]
            return httpx.Response(200, json={"resources": res}) if res else httpx.Response(404, json={})
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
            return httpx.Response(200, json=obj) if obj else httpx.Response(404, json={"reason": "NotFound"})
        if method == "GET":
            return httpx.Response(200, json={"items": [o for k, o in self.objects.items() if k.startswith(coll + "/")]})
        body = json.loads(request.content) if request.content else None
        if method == "POST":
            key = f"{coll}/{body['metadata']['name']}"
            if key in self.objects:
                return httpx.Response(409, json={"reason": "AlreadyExists", "message": "exists"})
            if (why := self._limits(body)):
                return httpx.Response(422, json={"reason": "Invalid", "message": why})
            self.objects[key] = body
            return httpx.Response(201, json=body)
        if method == "PATCH":
            if key not in self.objects:
                return httpx.Response(404, json={"reason": "NotFound", "message": "not found"})
            new = merge(self.objects[key], {"status": body.get("status")} if sub == "status" else body)
            if (why := self._limits(new)):
                return httpx.Response(422, json={"reason": "Invalid", "message": why})
            self.objects[key] = new
            return httpx.Response(200, json=new)
        if method == "DELETE":
            return httpx.Response(200 if self.objects.pop(key, None) else 404, json={})
        return httpx.Response(405, json={})

    def put(self, path: str, obj: dict) -> None:
        assert self._limits(obj) is None
        self.objects[path] = obj

    def writes(self) -> int:
        return sum(n for k, n in self.requests.items() if not k.startswith("GET"))
