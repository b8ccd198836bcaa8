"""Create-or-patch of the objects the operator owns, writing only when something differs.

Each owned object carries a record of what the operator last applied, in one annotation. The
record is the body's *shape*: every key, with each long string value (a ConfigMap's data, a long
command line) replaced by its sha256. So it stays a few KiB whatever the object holds (a copy of
the whole body would hit the API server's 256 KiB cap on annotations), yet still says which keys
the operator set (so a patch can remove the ones it no longer wants) and whether a value changed
(fields the API server normalises, like resource quantities, are compared through it).
A write happens only when the desired body differs from that record, or when the live object
drifted from the desired one (someone edited it); the write is a JSON merge patch. No PUT.
Every body is checked against the API server's size limits (limits.py) before it is sent.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from . import constants as C
from . import limits
from .kube import ApiError, KubeClient, Ref

# Keys whose values the API server normalises (resource quantities: "1000m" -> "1"), so that
# the live value cannot be compared with the desired one; the last-applied record covers them.
UNCOMPARABLE_KEYS = frozenset({"resources"})


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _strip_record(desired: dict) -> dict:
    body = copy.deepcopy(desired)
    anns = body.get("metadata", {}).get("annotations")
    if anns is not None:
        anns.pop(C.ANN_LAST_APPLIED, None)
        if not anns:
            body["metadata"].pop("annotations")
    return body


# Strings longer than this enter the record as their digest only.
RECORD_INLINE_MAX = 128
DIGEST_PREFIX = "sha256:"


def skeleton(obj: Any) -> Any:
    """The record of a body: its keys and short values, long strings replaced by a digest."""
    if isinstance(obj, dict):
        return {k: skeleton(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [skeleton(v) for v in obj]
    if isinstance(obj, str) and len(obj) > RECORD_INLINE_MAX:
        return DIGEST_PREFIX + hashlib.sha256(obj.encode()).hexdigest()
    return obj


def with_record(desired: dict) -> dict:
    """The desired body with its own last-applied record (its skeleton) annotated on it."""
    body = _strip_record(desired)
    record = canonical(skeleton(body))
    body.setdefault("metadata", {}).setdefault("annotations", {})[C.ANN_LAST_APPLIED] = record
    return body


def is_subset(want: Any, have: Any) -> bool:
    """True when every value in `want` is present and equal in `have` (extra keys in `have`,
    e.g. server defaults, are fine). Lists must match element by element."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return False
        for k, v in want.items():
            if k in UNCOMPARABLE_KEYS:
                continue
            if k not in have or not is_subset(v, have[k]):
                return False
        return True
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return False
        return all(is_subset(a, b) for a, b in zip(want, have))
    if isinstance(want, (int, float)) and isinstance(have, (int, float)) and not isinstance(want, bool):
        return float(want) == float(have)
    return want == have


def removal_nulls(previous: Any, desired: Any, keep: frozenset[tuple[str, ...]] = frozenset(),
                  _path: tuple[str, ...] = ()) -> Any:
    """A merge-patch fragment that deletes the keys `previous` had and `desired` lacks
    (except the paths in `keep`, which the operator stopped owning but must not delete)."""
    if not isinstance(previous, dict) or not isinstance(desired, dict):
        return None
    out: dict[str, Any] = {}
    for k, v in previous.items():
        if _path + (k,) in keep:
            continue
        if k not in desired:
            out[k] = None
        else:
            sub = removal_nulls(v, desired[k], keep, _path + (k,))
            if sub:
                out[k] = sub
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def plan(observed: dict | None, desired: dict, on_create: dict | None = None,
         keep: frozenset[tuple[str, ...]] = frozenset()) -> tuple[str, dict | None]:
    """('create', body) | ('patch', merge_patch) | ('unchanged', None) for one owned object.
    `on_create` is merged into the body only when creating (a field someone else then owns,
    like the replicas an autoscaler sets); `keep` lists such paths, never nulled by a patch."""
    body = with_record(desired)
    if observed is None:
        return "create", deep_merge(body, on_create) if on_create else body
    if is_subset(body, observed):
        return "unchanged", None
    previous_raw = (observed.get("metadata", {}).get("annotations") or {}).get(C.ANN_LAST_APPLIED)
    try:
        previous = json.loads(previous_raw) if previous_raw else {}
    except ValueError:
        previous = {}
    patch_body = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
    patch_body["metadata"] = {k: v for k, v in body["metadata"].items() if k not in ("name", "namespace")}
    nulls = removal_nulls({k: v for k, v in previous.items() if k not in ("apiVersion", "kind", "status")},
                          patch_body, keep) or {}
    nulls.get("metadata", {}).pop("name", None)
    nulls.get("metadata", {}).pop("namespace", None)
    return "patch", deep_merge(nulls, patch_body)


def ref_of(body: dict) -> Ref:
    api_version = body["apiVersion"]
    plural = {"ConfigMap": "configmaps", "Service": "services", "Deployment": "deployments",
              "Ingress": "ingresses", "InferencePool": "inferencepools", "Secret": "secrets",
              "HTTPScaledObject": "httpscaledobjects"}[body["kind"]]
    return Ref(api_version, plural, body["metadata"]["namespace"], body["metadata"]["name"])


async def ensure(kube: KubeClient, desired: dict, observed: dict | None | bool = False,
                 on_create: dict | None = None, keep: frozenset[tuple[str, ...]] = frozenset()) -> str:
    """Make the live object match `desired`. Returns 'created', 'patched' or 'unchanged'.
    Pass `observed` when already fetched (None = known absent)."""
    ref = ref_of(desired)
    limits.check(with_record(desired))
    live = await kube.get(ref) if observed is False else observed
    action, body = plan(live, desired, on_create, keep)  # type: ignore[arg-type]
    if action == "create":
        try:
            await kube.create(ref, body)  # type: ignore[arg-type]
        except ApiError as e:
            if e.status != 409:
                raise
            # Created concurrently (another handler of ours, a retry): compare with that one.
            live = await kube.get(ref)
            action, body = plan(live, desired, on_create, keep)
            if action == "patch":
                await kube.patch(ref, body)
                return "patched"
            return "unchanged"
        return "created"
    if action == "patch":
        await kube.patch(ref, body)
        return "patched"
    return action


async def remove(kube: KubeClient, ref: Ref, owner_uid: str | None) -> bool:
    """Delete an owned object that is no longer wanted (only when it is really ours)."""
    live = await kube.get(ref)
    if live is None:
        return False
    owners = live.get("metadata", {}).get("ownerReferences") or []
    if owner_uid and not any(o.get("uid") == owner_uid for o in owners):
        return False
    return await kube.delete(ref)
