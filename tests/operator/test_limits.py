"""Object sizes at catalog scale: what the operator renders for a base with 10,000 adapters, each
with its own tenant key, stays inside the API server's limits (kmock enforces none of them)."""
from __future__ import annotations

import json

import pytest

from loraplex.manifest import AdapterManifest, hash_api_key
from loraplex.operator import apply, limits, render
from loraplex.operator import constants as C

from .sizes import ANNOTATIONS_LIMIT, annotation_bytes, assert_within_limits, data_bytes
from .test_render import bmd

N = 10_000


def catalog(n: int, preload: int = 0) -> list[AdapterManifest]:
    return [AdapterManifest(name=f"tenant-{i:05d}-support", source="s3",
                            uri=f"s3://adapters-bucket/catalog/tenant-{i:05d}/support-v3",
                            sha256=f"{i:064x}", preload=i < preload,
                            tenants=[hash_api_key(f"sk-tenant-{i}")]) for i in range(n)]


def test_the_old_way_was_over_the_limits():
    """The defect: the whole manifest list in the ConfigMap, and again in an annotation."""
    full = render.render_configmap(bmd(), [])
    full["data"] = {C.MANIFEST_KEY: json.dumps({"adapters": [m.model_dump(exclude_none=True)
                                                              for m in catalog(N)]})}
    assert data_bytes(full) > 2 * 1024 * 1024
    copied = {**full, "metadata": {**full["metadata"], "annotations": {C.ANN_LAST_APPLIED: json.dumps(full)}}}
    assert annotation_bytes(copied) > ANNOTATIONS_LIMIT
    with pytest.raises(limits.ObjectTooLarge):
        limits.check(full)
    with pytest.raises(limits.ObjectTooLarge):
        limits.check(copied)


def test_every_owned_object_fits_at_ten_thousand_adapters():
    base = bmd({"engine": {"maxActiveAdapters": 16, "args": ["--max-num-seqs", "256"] * 40}})
    manifests = catalog(N, preload=15)  # the engine allows at most slots - 1 preload adapters
    sizes = {}
    for desired in (render.render_configmap(base, [m for m in manifests if m.preload]),
                    render.render_deployment(base, 4), render.render_service(base)):
        created = apply.plan(None, desired)[1]
        limits.check(created)
        sizes[desired["kind"]] = assert_within_limits(created)
        # The record is the body's shape, never a copy of a long value.
        assert annotation_bytes(created) < 16 * 1024, (desired["kind"], annotation_bytes(created))
    assert sizes["ConfigMap"]["data"] < 8 * 1024, sizes


def test_record_keeps_long_values_as_digests_and_still_sees_their_change():
    base = bmd()
    one = render.render_configmap(base, catalog(40, preload=40))
    two = render.render_configmap(base, catalog(41, preload=41))
    _, live = apply.plan(None, one)
    record = live["metadata"]["annotations"][C.ANN_LAST_APPLIED]
    assert one["data"][C.MANIFEST_KEY] not in record and apply.DIGEST_PREFIX in record
    assert apply.plan(live, one) == ("unchanged", None)
    action, patch = apply.plan(live, two)
    assert action == "patch" and patch["data"][C.MANIFEST_KEY] == two["data"][C.MANIFEST_KEY]
