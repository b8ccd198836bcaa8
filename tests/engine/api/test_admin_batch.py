"""The manifest API at catalog scale, through HTTP: many manifests in one request
(`POST /v1/adapters:batch`) and the compact listing (`GET /v1/adapters?view=compact`)."""
from __future__ import annotations

import httpx

from loraplex.manifest import AdapterManifest, hash_api_key, manifest_digest
from tests.engine.api.conftest import ADMIN, MAX_BODY_BYTES, assert_error

BATCH = "/v1/adapters:batch"


def test_batch_registers_each_manifest_and_refuses_bad_ones_alone(server):
    good = [{"name": f"batch-{i}", "source": "local", "uri": "a2", "tenants": [hash_api_key(f"k{i}")]}
            for i in range(3)]
    body = {"adapters": [good[0], good[1], {"name": "Bad_Name", "uri": "a2"}, "not-an-object", good[2],
                         {"name": "batch-preload-x", "uri": "a2", "source": "ftp"}]}
    try:
        r = httpx.post(server.url + BATCH, json=body, headers=ADMIN, timeout=60)
        assert r.status_code == 200, r.text
        rows = r.json()["data"]
        assert [row["name"] for row in rows] == ["batch-0", "batch-1", "Bad_Name", None, "batch-2", "batch-preload-x"]
        for row, m in zip([rows[0], rows[1], rows[4]], good):
            assert row["state"] == "registered" and row["manifest"] == AdapterManifest(**m).model_dump(exclude_none=True)
            assert row["manifest_digest"] == manifest_digest(AdapterManifest(**m))
            # the same state as the per-adapter route reports
            assert httpx.get(server.url + f"/v1/adapters/{m['name']}", headers=ADMIN).json() == row
        for row, param in ((rows[2], "adapters.2.name"), (rows[3], "adapters.3"), (rows[5], "adapters.5.source")):
            assert row["status"] == 400 and "state" not in row, row
            assert set(row["error"]) >= {"message", "type", "param", "code"} and row["error"]["param"] == param
            assert row["error"]["code"] == "invalid_manifest"
        assert_error(httpx.get(server.url + "/v1/adapters/Bad_Name", headers=ADMIN), 404)
        # Idempotent: the same batch again changes nothing.
        again = httpx.post(server.url + BATCH, json=body, headers=ADMIN, timeout=60).json()["data"]
        assert again == rows
    finally:
        for m in good:
            httpx.delete(server.url + f"/v1/adapters/{m['name']}", headers=ADMIN)


def test_batch_refuses_malformed_bodies_whole(server):
    url = server.url + BATCH
    assert_error(httpx.post(url, json={"adapters": {"name": "x"}}, headers=ADMIN), 400, "invalid_value")
    assert_error(httpx.post(url, json=[{"name": "x", "uri": "a2"}], headers=ADMIN), 400)
    twice = {"adapters": [{"name": "dup", "uri": "a2"}, {"name": "dup", "uri": "a3"}]}
    err = assert_error(httpx.post(url, json=twice, headers=ADMIN), 400, "invalid_value")
    assert "twice" in err["message"]
    many = {"adapters": [{"name": f"m{i}", "uri": "a2"} for i in range(1001)]}
    assert_error(httpx.post(url, json=many, headers=ADMIN), 400, "invalid_value")
    big = {"adapters": [{"name": f"big-{i}", "uri": "a2" + "/x" * 200} for i in range(MAX_BODY_BYTES // 400 + 1)]}
    assert_error(httpx.post(url, json=big, headers=ADMIN), 413)
    names = {a["name"] for a in httpx.get(server.url + "/v1/adapters", headers=ADMIN).json()["data"]}
    assert not names & {"dup", "m0", "big-0"}, "a refused batch registers nothing"


def test_compact_listing_names_state_and_manifest_digest(server):
    full = httpx.get(server.url + "/v1/adapters", headers=ADMIN).json()["data"]
    compact = httpx.get(server.url + "/v1/adapters", params={"view": "compact"}, headers=ADMIN).json()["data"]
    assert [a["name"] for a in compact] == [a["name"] for a in full] == sorted(a["name"] for a in full)
    assert {"a1", "a2", "private-a"} <= {a["name"] for a in compact}
    for small, big in zip(compact, full):
        assert set(small) == {"name", "state", "message", "dynamic", "manifest_digest"}
        assert all(small[k] == big[k] for k in ("name", "dynamic", "manifest_digest"))  # states may move on
        assert small["manifest_digest"] == manifest_digest(AdapterManifest(**big["manifest"]))
    assert_error(httpx.get(server.url + "/v1/adapters", params={"view": "all"}, headers=ADMIN), 400, "invalid_value")
