"""--adapter-manifest-file is watched and reconciled; /ready waits for preload adapters."""
from __future__ import annotations

import hashlib

import httpx

from tests.engine.api.conftest import ADMIN, KEY_A, initial_manifests, shutil_copy_adapter, wait_until, write_manifest_file


def model_ids(server) -> set[str]:
    return {m["id"] for m in httpx.get(server.url + "/v1/models", headers=ADMIN).json()["data"]}


def applied(server) -> int:
    return httpx.get(server.url + "/info").json()["manifest_file"]["versions_applied"]


def test_file_add_and_remove(server, assets):
    assert {"a2", "a3", "private-a"} <= model_ids(server)
    write_manifest_file(assets.manifest_file, initial_manifests() + [{"name": "watched", "source": "local", "uri": "a1"}])
    wait_until(lambda: "watched" in model_ids(server), 20, "the added adapter in /v1/models")
    r = httpx.post(server.url + "/v1/completions", headers=KEY_A, timeout=60,
                   json={"model": "watched", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    write_manifest_file(assets.manifest_file, initial_manifests())
    wait_until(lambda: "watched" not in model_ids(server), 20, "the removed adapter to leave /v1/models")
    assert {"a2", "a3", "private-a"} <= model_ids(server)  # the others stay
    r = httpx.post(server.url + "/v1/completions", headers=KEY_A, json={"model": "watched", "prompt": "hi"})
    assert r.status_code == 404


def test_bad_file_keeps_the_last_good_set(server, assets):
    before = model_ids(server)
    good_versions = applied(server)
    assets.manifest_file.write_text('{"adapters": [{"name": "BAD NAME", "uri": "x"}]}')
    wait_until(lambda: httpx.get(server.url + "/info").json()["manifest_file"]["error"], 20, "the watcher to see the bad file")
    assert model_ids(server) == before
    assets.manifest_file.write_text("{not json")
    wait_until(lambda: "not a valid manifest" in (httpx.get(server.url + "/info").json()["manifest_file"]["error"] or "")
               and "BAD NAME" not in httpx.get(server.url + "/info").json()["manifest_file"]["error"],
               20, "the watcher to see the second bad file")
    assert model_ids(server) == before
    assert applied(server) == good_versions
    write_manifest_file(assets.manifest_file, initial_manifests())
    wait_until(lambda: httpx.get(server.url + "/info").json()["manifest_file"]["error"] is None, 20, "recovery")
    assert model_ids(server) == before


def test_ready_waits_for_preload_adapters(server, assets):
    assert httpx.get(server.url + "/ready").status_code == 200
    # a preload adapter whose files are not there yet: /ready must say 503 and why
    preload = {"name": "pre", "source": "local", "uri": "pre-files", "preload": True}
    write_manifest_file(assets.manifest_file, initial_manifests() + [preload])

    def not_ready():
        r = httpx.get(server.url + "/ready")
        return r if r.status_code == 503 and r.json()["missing_preload_adapters"] == ["pre"] \
            and r.json()["adapters"]["pre"]["state"] == "failed" else None

    r = wait_until(not_ready, 20, "/ready to report the missing preload adapter")
    body = r.json()
    assert body["model_loaded"] is True and body["error"]["code"] == "not_ready"
    assert "does not exist" in body["adapters"]["pre"]["message"]
    # inference on other adapters is unaffected while /ready is 503
    ok = httpx.post(server.url + "/v1/completions", headers=KEY_A, timeout=60,
                    json={"model": "a2", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    # deliver the files and change the manifest (a digest now): the adapter loads, /ready turns 200
    files = shutil_copy_adapter(assets, "a2", "pre-files")
    digest = hashlib.sha256((files / "adapter_model.safetensors").read_bytes()).hexdigest()
    write_manifest_file(assets.manifest_file, initial_manifests() + [{**preload, "sha256": digest}])
    wait_until(lambda: httpx.get(server.url + "/ready").status_code == 200, 30, "/ready after the preload loaded")
    assert httpx.get(server.url + "/v1/adapters/pre", headers=ADMIN).json()["state"] == "device"
    write_manifest_file(assets.manifest_file, initial_manifests())
    wait_until(lambda: "pre" not in model_ids(server), 20, "the preload adapter to be removed")
    assert httpx.get(server.url + "/ready").status_code == 200
