"""--adapter-catalog-url: an engine looks up the adapters it was not given in the operator's catalog
(engine/loraplex/engine/core/adapters/catalog_source.py), and serves them with their own tenants, sha256 and source.

The catalog here is a small local HTTP server playing the operator's part (the operator's own
endpoint is tested against kmock in tests/operator/test_catalog_endpoint.py); the engine is a
real `loraplex-engine` process with API keys and an admin token.
"""
from __future__ import annotations

import http.server
import json
import threading

import httpx
import pytest

from loraplex.engine.core.adapters.catalog_source import (CatalogRefusedError, CatalogSource,
                                                          CatalogUnavailableError)
from loraplex.engine.core.errors import UnknownAdapterError
from loraplex.manifest import hash_api_key
from tests.engine.api.conftest import (ADMIN_TOKEN, assert_error, engine_process, free_port, parse_metrics,
                                       wait_until)

PREFIX = "/catalog/v1/team/base"


class FakeCatalog:
    """GET {PREFIX}/adapters/{name} -> answers[name] = (status, body); records every request."""

    def __init__(self):
        self.answers: dict[str, tuple[int, dict]] = {}
        self.requests: list[tuple[str, str | None]] = []  # (name, Authorization header)
        self.down = False  # answer 503, as an operator that cannot read the API server would
        catalog = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                name = self.path.rsplit("/", 1)[-1]
                catalog.requests.append((name, self.headers.get("Authorization")))
                if not self.path.startswith(PREFIX + "/adapters/"):
                    status, body = 404, {"error": {"message": "no route"}}
                elif catalog.down:
                    status, body = 503, {"error": {"message": "cannot read the API server"}}
                elif self.headers.get("Authorization") != f"Bearer {ADMIN_TOKEN}":
                    status, body = 403, {"error": {"message": "not the base's admin token"}}
                else:
                    status, body = catalog.answers.get(name, (404, {"error": {"message": f"no LoraAdapter {name}"}}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{PREFIX}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def calls(self, name: str) -> int:
        return sum(1 for n, _ in self.requests if n == name)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def catalog():
    c = FakeCatalog()
    yield c
    c.close()


def manifest(name: str, uri: str, tenants: list[str] | None = None, **extra) -> tuple[int, dict]:
    return 200, {"name": name, "source": "local", "uri": uri, "tenants": tenants or [], **extra}


# --- the source alone -------------------------------------------------------------------------

def test_catalog_source_maps_answers_to_request_errors(catalog, tmp_path):
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN + "\n")
    src = CatalogSource(catalog.url, str(token))
    catalog.answers["unit-ok"] = manifest("unit-ok", "a2", [hash_api_key("key-a")], preload=True, sha256="ab" * 32)
    catalog.answers["unit-gone"] = (409, {"error": {"message": "LoraAdapter 'unit-gone' is being deleted"}})
    catalog.answers["unit-other"] = manifest("someone-else", "a2")
    m = src.locate("unit-ok")
    assert (m.name, m.uri, m.tenants, m.sha256) == ("unit-ok", "a2", [hash_api_key("key-a")], "ab" * 32)
    assert m.preload is False  # a just-in-time copy is never pinned
    assert catalog.requests[-1] == ("unit-ok", f"Bearer {ADMIN_TOKEN}")
    with pytest.raises(UnknownAdapterError, match="no LoraAdapter unit-missing"):
        src.locate("unit-missing")
    with pytest.raises(CatalogRefusedError, match="being deleted") as refused:
        src.locate("unit-gone")
    assert refused.value.status == 424 and refused.value.negative_cache
    with pytest.raises(CatalogUnavailableError, match="manifest of 'someone-else'"):
        src.locate("unit-other")
    calls = len(catalog.requests)
    for bad in ("Org/Repo", "../a2", "x" * 64, ""):  # no LoraAdapter can have these names
        with pytest.raises(UnknownAdapterError):
            src.locate(bad)
    assert len(catalog.requests) == calls  # not worth a call
    token.write_text("rotated\n")  # the token is read at each call: a rotated Secret is used at once
    with pytest.raises(CatalogUnavailableError, match="answered 403") as denied:
        src.locate("unit-ok")
    assert denied.value.status == 503 and denied.value.retry_after
    dead = CatalogSource(f"http://127.0.0.1:{free_port()}{PREFIX}", str(token))
    with pytest.raises(CatalogUnavailableError, match="unreachable"):
        dead.locate("unit-ok")
    with pytest.raises(ValueError, match="http"):
        CatalogSource("ftp://x", None)
    src.close()
    dead.close()


# --- a real engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(assets, catalog):
    args = ["--model-id", str(assets.base), "--device", "cpu", "--num-threads", "1", "--num-kv-blocks", "64",
            # a default source that knows a1..a3 by name: with a catalog it must never be asked
            "--adapter-dir", str(assets.adapter_dir),
            "--api-keys-file", str(assets.keys_file), "--admin-token-file", str(assets.admin_file),
            "--adapter-catalog-url", catalog.url, "--adapter-catalog-ttl-seconds", "2",
            "--adapter-negative-cache-seconds", "60"]
    with engine_process("catalog-engine", args, assets.root / "catalog-engine.log",
                        env={"OMP_NUM_THREADS": "1"}) as proc:
        yield proc


def complete(engine, model: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(engine.url + "/v1/completions", headers=headers, timeout=120,
                      json={"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0})


def admin_get(engine, name: str) -> httpx.Response:
    return httpx.get(engine.url + f"/v1/adapters/{name}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def test_unplaced_adapter_is_served_with_its_tenants(engine, catalog):
    catalog.answers["priv"] = manifest("priv", "a2", [hash_api_key("key-a")])
    mark = len(catalog.requests)
    # A caller whose key the adapter does not list: 404 (it does not exist for them), and the pod
    # does not load it for them.
    assert_error(complete(engine, "priv", "key-b"), 404, "model_not_found")
    assert admin_get(engine, "priv").json()["state"] == "registered"
    assert_error(complete(engine, "priv", None), 401)
    r = complete(engine, "priv", "key-a")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "priv"
    described = admin_get(engine, "priv").json()
    assert described["dynamic"] is True and described["manifest"]["tenants"] == [hash_api_key("key-a")]
    assert catalog.requests[mark:] == [("priv", f"Bearer {ADMIN_TOKEN}")]  # one lookup, with the admin token


def test_a_jit_entry_placed_later_is_registered_with_its_weights(engine, catalog):
    """The operator places an adapter on a pod that loaded it just in time: its PUT (the same
    manifest) makes the entry registered, keeping the loaded weights (no second load)."""
    catalog.answers["adopted"] = manifest("adopted", "a3")
    assert complete(engine, "adopted", "key-a").status_code == 200
    before = admin_get(engine, "adopted").json()
    assert before["dynamic"] is True and before["state"] in ("host", "device")
    r = httpx.put(engine.url + "/v1/adapters/adopted", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                  json={"name": "adopted", "source": "local", "uri": "a3", "tenants": []})
    assert r.status_code == 200, r.text
    after = admin_get(engine, "adopted").json()
    assert after["dynamic"] is False and after["state"] == before["state"]
    assert after["load_seconds"] == before["load_seconds"]  # the same load: not loaded again


def test_names_the_catalog_does_not_know_are_404_and_remembered(engine, catalog):
    for _ in range(3):  # a3 is in --adapter-dir: with a catalog, the default source is not asked
        assert_error(complete(engine, "a3", "key-a"), 404, "model_not_found")
    assert catalog.calls("a3") == 1  # negative-cached
    catalog.answers["failed-one"] = (409, {"error": {"message": "LoraAdapter 'failed-one' is Failed: sha256"}})
    for _ in range(2):
        err = assert_error(complete(engine, "failed-one", "key-a"), 424)
        assert "is Failed" in err["message"]
    assert catalog.calls("failed-one") == 1


def test_catalog_down_is_503_with_retry_after_and_not_remembered(engine, catalog):
    catalog.answers["later"] = manifest("later", "a3")
    catalog.down = True
    try:
        r = complete(engine, "later", "key-b")
        assert_error(r, 503, "adapter_catalog_unavailable")
        assert int(r.headers["Retry-After"]) > 0
        # other requests go on meanwhile: the base model's (an adapter looked up earlier may be past
        # its 2 s TTL by now on a loaded machine, and then rightly needs the catalog too)
        models = httpx.get(engine.url + "/v1/models", headers={"Authorization": "Bearer key-a"}, timeout=30).json()
        base = next(m["id"] for m in models["data"] if m.get("parent") in (None, ""))
        assert complete(engine, base, "key-a").status_code == 200
    finally:
        catalog.down = False
    r = complete(engine, "later", "key-b")  # not negative-cached: asked again, served
    assert r.status_code == 200, r.text
    assert catalog.calls("later") == 2


def test_a_tenant_change_reaches_the_pod_after_the_ttl(engine, catalog):
    catalog.answers["moving"] = manifest("moving", "a2", [hash_api_key("key-a")])
    assert complete(engine, "moving", "key-a").status_code == 200
    catalog.answers["moving"] = manifest("moving", "a2", [hash_api_key("key-b")])  # key-a revoked
    wait_until(lambda: complete(engine, "moving", "key-a").status_code == 404, 15, "key-a refused after the TTL",
               interval=0.5)
    assert complete(engine, "moving", "key-b").status_code == 200
    del catalog.answers["moving"]  # deleted: gone from this pod too once the TTL is over
    wait_until(lambda: complete(engine, "moving", "key-b").status_code == 404, 15, "404 after deletion",
               interval=0.5)


def test_the_catalog_manifest_sha256_is_verified(engine, catalog):
    catalog.answers["bad-sha"] = manifest("bad-sha", "a2", sha256="0" * 64)
    err = assert_error(complete(engine, "bad-sha", "key-a"), 424)
    assert "sha256 mismatch" in err["message"]


def test_catalog_lookups_are_counted_by_result(engine, catalog):
    """loraplex_adapter_catalog_requests_total{result}: an outage shows as `unavailable` (the
    tests above made every kind of answer)."""
    samples = parse_metrics(httpx.get(engine.url + "/metrics").text)
    counts = {dict(labels)["result"]: v for (name, labels), v in samples.items()
              if name == "loraplex_adapter_catalog_requests_total"}
    assert set(counts) == {"ok", "not_found", "refused", "unavailable"}
    assert counts["ok"] >= 4 and counts["not_found"] >= 2 and counts["refused"] == 1 and counts["unavailable"] == 1, counts


def test_an_unplaced_pod_splits_a_revisioned_adapter_like_a_placed_one(engine, catalog):
    """A catalog answer with revisions (what the operator serves for a LoraAdapter) is split,
    pinned and tenant-checked as a pushed one; the operator's PUT of it later keeps the weights."""
    body = {"name": "revved", "source": "local", "uri": "a3", "tenants": [hash_api_key("key-a")],
            "revisions": [{"number": 1, "source": "local", "uri": "a2", "percent": 70},
                          {"number": 2, "source": "local", "uri": "a3", "percent": 30}]}
    catalog.answers["revved"] = (200, body)
    assert_error(complete(engine, "revved@2", "key-b"), 404, "model_not_found")  # another tenant: missing
    pinned = complete(engine, "revved@2", "key-a")  # a pin resolves the name through the catalog too
    assert pinned.status_code == 200 and pinned.headers["x-loraplex-adapter-revision"] == "2"

    def served(user: str) -> str:
        r = httpx.post(engine.url + "/v1/completions", headers={"Authorization": "Bearer key-a"}, timeout=120,
                       json={"model": "revved", "prompt": "Hello", "max_tokens": 1, "user": user})
        assert r.status_code == 200, r.text
        return r.headers["x-loraplex-adapter-revision"]

    got = {u: served(u) for u in (f"user-{i}" for i in range(30))}
    assert set(got.values()) == {"1", "2"}
    assert all(served(u) == got[u] for u in list(got)[:5])  # sticky
    described = admin_get(engine, "revved").json()
    assert described["dynamic"] is True and [r["number"] for r in described["revisions"]] == [2, 1]
    loaded = {r["number"]: r["load_seconds"] for r in described["revisions"]}
    r = httpx.put(engine.url + "/v1/adapters/revved", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, json=body)
    assert r.status_code == 200, r.text
    after = admin_get(engine, "revved").json()
    assert after["dynamic"] is False
    assert {r["number"]: r["load_seconds"] for r in after["revisions"]} == loaded  # adopted: not loaded again
