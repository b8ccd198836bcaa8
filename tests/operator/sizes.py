"""Sizes of Kubernetes objects as a real API server counts them, measured independently of the
operator's own checks (kmock enforces no limit, so the tests do)."""
from __future__ import annotations

import base64
import json

KIB = 1024
ANNOTATIONS_LIMIT = 256 * KIB      # all annotations of one object, keys + values
CONFIGMAP_DATA_LIMIT = 1024 * KIB  # a ConfigMap's data
SECRET_DATA_LIMIT = 1024 * KIB     # a Secret's data, decoded (core/v1 validation: MaxSecretSize)
OBJECT_LIMIT = 1536 * KIB          # etcd's default request size


def annotation_bytes(obj: dict) -> int:
    anns = (obj.get("metadata") or {}).get("annotations") or {}
    return sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in anns.items())


def data_bytes(obj: dict) -> int:
    return sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in (obj.get("data") or {}).items())


def secret_data_bytes(obj: dict) -> int:
    """The decoded bytes of a Secret's data values (what the API server sums against 1 MiB)."""
    return sum(len(base64.b64decode(v)) for v in (obj.get("data") or {}).values())


def object_bytes(obj: dict) -> int:
    return len(json.dumps(obj).encode("utf-8"))


def assert_within_limits(obj: dict) -> dict:
    """Assert the API server would take `obj`; return its measured sizes."""
    what = f"{obj.get('kind')} {(obj.get('metadata') or {}).get('name')}"
    sizes = {"annotations": annotation_bytes(obj), "data": data_bytes(obj), "object": object_bytes(obj)}
    assert sizes["annotations"] <= ANNOTATIONS_LIMIT, f"{what}: annotations {sizes}"
    if obj.get("kind") == "Secret":
        sizes["data"] = secret_data_bytes(obj)
        assert sizes["data"] <= SECRET_DATA_LIMIT, f"{what}: data {sizes}"
    assert sizes["data"] < CONFIGMAP_DATA_LIMIT, f"{what}: data {sizes}"
    assert sizes["object"] < OBJECT_LIMIT, f"{what}: object {sizes}"
    return sizes
