"""The API server's size limits, and checks the operator runs before it writes.

A real kube-apiserver refuses an object whose annotations exceed 256 KiB in total, a ConfigMap
whose data exceeds 1 MiB, a Secret whose data (decoded) exceeds 1 MiB, and any request body over about 1.5 MiB (etcd's default request
limit). Emulators (kmock) enforce none of these, so the operator checks them itself before
every write of an owned object: a clear error then, instead of a rejected write in production.
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import Any

ANNOTATIONS_MAX = 256 * 1024          # apimachinery ValidateAnnotations: total of keys + values
CONFIGMAP_DATA_MAX = 1024 * 1024      # core/v1 ConfigMap: data + binaryData
SECRET_DATA_MAX = 1024 * 1024         # core/v1 Secret: the decoded bytes of data (MaxSecretSize)
OBJECT_MAX = 1536 * 1024              # etcd --max-request-bytes default (1.5 MiB)


class ObjectTooLarge(ValueError):
    """An object the operator was about to write is over one of the API server's limits."""


def annotations_size(body: dict) -> int:
    anns = (body.get("metadata") or {}).get("annotations") or {}
    return sum(len(k.encode()) + len(str(v).encode()) for k, v in anns.items())


def configmap_data_size(body: dict) -> int:
    data = body.get("data") or {}
    binary = body.get("binaryData") or {}
    return sum(len(k.encode()) + len(str(v).encode()) for k, v in {**data, **binary}.items())


def secret_data_size(body: dict) -> int:
    """The bytes of a Secret's data as the API server counts them: keys and decoded values."""
    total = 0
    for k, v in (body.get("data") or {}).items():
        try:
            total += len(k.encode()) + len(base64.b64decode(str(v), validate=True))
        except (binascii.Error, ValueError):
            total += len(k.encode()) + len(str(v).encode())
    return total + sum(len(k.encode()) + len(str(v).encode()) for k, v in (body.get("stringData") or {}).items())


def object_size(body: Any) -> int:
    return len(json.dumps(body, separators=(",", ":")).encode())


def check(body: dict) -> None:
    """Raise ObjectTooLarge when `body` would be refused by a real API server."""
    kind = body.get("kind", "object")
    name = (body.get("metadata") or {}).get("name", "")
    if (n := annotations_size(body)) > ANNOTATIONS_MAX:
        raise ObjectTooLarge(f"{kind} {name}: annotations total {n} bytes > {ANNOTATIONS_MAX}")
    if kind == "ConfigMap" and (n := configmap_data_size(body)) >= CONFIGMAP_DATA_MAX:
        raise ObjectTooLarge(f"ConfigMap {name}: data {n} bytes >= {CONFIGMAP_DATA_MAX}")
    if kind == "Secret" and (n := secret_data_size(body)) > SECRET_DATA_MAX:
        raise ObjectTooLarge(f"Secret {name}: data {n} bytes > {SECRET_DATA_MAX}")
    if (n := object_size(body)) > OBJECT_MAX:
        raise ObjectTooLarge(f"{kind} {name}: {n} bytes > {OBJECT_MAX}")
