"""API keys per tenant, adapter tenant lists, the admin token, and the admin routes."""
from __future__ import annotations

import json

import httpx
import pytest

from loraplex.manifest import hash_api_key
from tests.engine.api.conftest import ADMIN, KEY_A, KEY_B, assert_error, auth, wait_until

COMPLETION = {"prompt": "The quick brown fox", "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"model": "a2", **COMPLETION}),
    ("/v1/chat/completions", {"model": "a2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
    ("/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
    ("/", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
])
def test_inference_routes_need_a_valid_key(server, route, body):
    url = server.url + route
    assert_error(httpx.post(url, json=body), 401, "missing_api_key")
    assert_error(httpx.post(url, json=body, headers=auth("nope")), 401, "invalid_api_key")
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Basic a2V5LWE="}), 401, "missing_api_key")
    assert httpx.post(url, json=body, headers=KEY_A, timeout=60).status_code == 200
    assert httpx.post(url, json=body, headers=KEY_B, timeout=60).status_code == 200


def test_models_need_a_key(server):
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    assert_error(httpx.get(server.url + "/v1/models", headers=auth("wrong")), 401)


def test_tenant_restricted_adapter(server):
    url = server.url + "/v1/completions"
    body = {"model": "private-a", **COMPLETION}
    assert httpx.post(url, json=body, headers=KEY_A, timeout=60).status_code == 200
    # another tenant's key: the adapter does not exist for it (test_another_tenants_adapter_is_a_404)
    assert_error(httpx.post(url, json=body, headers=KEY_B), 404, "model_not_found")
    assert_error(httpx.post(url, json=body), 401)
    assert_error(httpx.post(url, json=body, headers=auth("wrong")), 401)
    # LoRAX route, same rule
    lorax = {"inputs": "hi", "parameters": {"adapter_id": "private-a", "max_new_tokens": 2}}
    assert_error(httpx.post(server.url + "/generate", json=lorax, headers=KEY_B), 404, "model_not_found")
    assert httpx.post(server.url + "/generate", json=lorax, headers=KEY_A, timeout=60).status_code == 200
    # /v1/models lists for a key only what it may call
    for headers, visible in ((KEY_A, True), (KEY_B, False), (ADMIN, True)):
        models = {m["id"] for m in httpx.get(server.url + "/v1/models", headers=headers).json()["data"]}
        assert ("private-a" in models) is visible
        assert {"tiny-base", "a1", "a2"} <= models
    assert_error(httpx.get(server.url + "/v1/models/private-a", headers=KEY_B), 404)
    assert httpx.get(server.url + "/v1/models/private-a", headers=KEY_A).json()["parent"] == "tiny-base"


ADMIN_CALLS = [
    ("GET", "/v1/adapters", None),
    ("GET", "/v1/adapters/a2", None),
    ("PUT", "/v1/adapters/auth-probe", {"source": "local", "uri": "a1"}),
    ("DELETE", "/v1/adapters/auth-probe", None),
    ("POST", "/v1/adapters:batch", {"adapters": []}),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "auth-probe", "lora_path": "a1"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "auth-probe"}),
]


@pytest.mark.parametrize("method,path,body", ADMIN_CALLS)
def test_admin_routes_need_the_admin_token(server, method, path, body):
    url = server.url + path
    assert_error(httpx.request(method, url, json=body), 401, "missing_admin_token")
    assert_error(httpx.request(method, url, json=body, headers=auth("wrong-token")), 401, "invalid_admin_token")
    assert_error(httpx.request(method, url, json=body, headers=KEY_A), 403, "forbidden")
    r = httpx.request(method, url, json=body, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text


def test_manifest_api_put_is_idempotent(server, assets):
    url = server.url + "/v1/adapters/put-test"
    manifest = {"name": "put-test", "source": "local", "uri": "a2", "tenants": [hash_api_key("key-b")]}
    first = httpx.put(url, json=manifest, headers=ADMIN)
    assert first.status_code == 200, first.text
    state = first.json()
    assert state["name"] == "put-test" and state["state"] == "registered" and state["message"] is None
    again = httpx.put(url, json=manifest, headers=ADMIN).json()
    assert again == state
    # name from the path when the body has none; a different name is refused
    assert httpx.put(url, json={"source": "local", "uri": "a2", "tenants": manifest["tenants"]},
                     headers=ADMIN).json()["manifest"] == state["manifest"]
    assert_error(httpx.put(url, json={**manifest, "name": "other"}, headers=ADMIN), 400, "name_mismatch")
    assert_error(httpx.put(url, json={**manifest, "source": "ftp"}, headers=ADMIN), 400, "invalid_manifest")
    assert_error(httpx.put(url, json={**manifest, "tenants": ["raw-key"]}, headers=ADMIN), 400, "invalid_manifest")
    assert_error(httpx.put(server.url + "/v1/adapters/Bad_Name", json={"uri": "a2"}, headers=ADMIN), 400)
    # it serves only its tenant
    body = {"model": "put-test", **COMPLETION}
    assert httpx.post(server.url + "/v1/completions", json=body, headers=KEY_B, timeout=60).status_code == 200
    assert_error(httpx.post(server.url + "/v1/completions", json=body, headers=KEY_A), 404, "model_not_found")
    got = httpx.get(url, headers=ADMIN).json()
    assert got["state"] in ("host", "device") and got["rank"] == 8
    assert "put-test" in {a["name"] for a in httpx.get(server.url + "/v1/adapters", headers=ADMIN).json()["data"]}
    assert httpx.delete(url, headers=ADMIN).json() == {"name": "put-test", "deleted": True}
    assert_error(httpx.delete(url, headers=ADMIN), 404)
    assert_error(httpx.get(url, headers=ADMIN), 404)
    assert_error(httpx.post(server.url + "/v1/completions", json=body, headers=KEY_B), 404, "model_not_found")


def test_vllm_load_and_unload(server, assets):
    load = httpx.post(server.url + "/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                      json={"lora_name": "vllm-style", "lora_path": str(assets.adapter_dir / "a3")})
    assert load.status_code == 200 and "added successfully" in load.text
    assert httpx.get(server.url + "/v1/adapters/vllm-style", headers=ADMIN).json()["state"] in ("host", "device")
    r = httpx.post(server.url + "/v1/completions", headers=KEY_A, timeout=60, json={"model": "vllm-style", **COMPLETION})
    assert r.status_code == 200
    # same call again: still fine
    assert httpx.post(server.url + "/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                      json={"lora_name": "vllm-style", "lora_path": str(assets.adapter_dir / "a3")}).status_code == 200
    unload = httpx.post(server.url + "/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "vllm-style"})
    assert unload.status_code == 200 and "removed successfully" in unload.text
    assert_error(httpx.post(server.url + "/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "vllm-style"}), 404)
    # a path that does not hold an adapter: 400 with the reason, nothing stays registered
    (assets.adapter_dir / "empty").mkdir(exist_ok=True)
    bad = httpx.post(server.url + "/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                     json={"lora_name": "vllm-bad", "lora_path": str(assets.adapter_dir / "empty")})
    err = assert_error(bad, 400, "adapter_load_failed")
    assert "adapter_config.json" in err["message"]
    assert_error(httpx.get(server.url + "/v1/adapters/vllm-bad", headers=ADMIN), 404)
    # outside the adapter directories: refused
    err = assert_error(httpx.post(server.url + "/v1/load_lora_adapter", headers=ADMIN, timeout=60,
                                  json={"lora_name": "vllm-escape", "lora_path": "/etc"}), 400)
    assert "outside the allowed adapter directories" in err["message"]


def test_open_server_needs_no_keys(open_server):
    models = httpx.get(open_server.url + "/v1/models")
    assert models.status_code == 200
    base = models.json()["data"][0]["id"]
    r = httpx.post(open_server.url + "/v1/completions", timeout=60, json={"model": base, **COMPLETION})
    assert r.status_code == 200, r.text
    assert httpx.get(open_server.url + "/v1/adapters").status_code == 200  # admin routes are open too


def replace_file(path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic, as a Secret update is


def completion_error(server, model: str, headers: dict) -> tuple[int, dict]:
    r = httpx.post(server.url + "/v1/completions", json={"model": model, **COMPLETION}, headers=headers, timeout=60)
    return r.status_code, r.json()["error"]


def test_another_tenants_adapter_is_indistinguishable_from_a_missing_one(server, open_server):
    """A 403 that names an adapter tells every tenant it exists (and its name, on a guess). To a
    caller whose key it does not list, a restricted adapter answers exactly as a name that does
    not exist: 404 model_not_found, with or without a key, on a server with or without keys."""
    def same_answer(server, hidden: str, missing: str, headers: dict) -> None:
        status, err = completion_error(server, hidden, headers)
        status_missing, err_missing = completion_error(server, missing, headers)
        assert (status, err["code"], err["type"], err["param"]) == (404, "model_not_found", "invalid_request_error", "model")
        assert (status_missing, err_missing["code"], err_missing["type"], err_missing["param"]) == \
            (status, err["code"], err["type"], err["param"])
        assert err["message"].replace(hidden, "X") == err_missing["message"].replace(missing, "X"), (err, err_missing)

    same_answer(server, "private-a", "no-such-adapter", KEY_B)
    # no keys file: a restricted adapter called without a key, or with another key (was 401 / 403)
    put = httpx.put(open_server.url + "/v1/adapters/open-private", timeout=30,
                    json={"source": "local", "uri": "a2", "tenants": [hash_api_key("key-a")]})
    assert put.status_code == 200, put.text
    try:
        same_answer(open_server, "open-private", "no-such-adapter", {})
        same_answer(open_server, "open-private", "no-such-adapter", KEY_B)
        assert httpx.post(open_server.url + "/v1/completions", json={"model": "open-private", **COMPLETION},
                          headers=KEY_A, timeout=60).status_code == 200
    finally:
        httpx.delete(open_server.url + "/v1/adapters/open-private", timeout=30)


def test_salted_key_hashes_in_tenants_and_in_the_keys_file(server, assets):
    """`pbkdf2_sha256$...` entries (salted) are accepted in a manifest's tenants and in the keys
    file; plain sha256 digests still are (deprecated)."""
    from loraplex.manifest import salted_key_hash

    url = server.url + "/v1/adapters/salted"
    put = httpx.put(url, headers=ADMIN, json={"source": "local", "uri": "a2", "tenants": [salted_key_hash("key-b")]})
    assert put.status_code == 200, put.text
    original = assets.keys_file.read_text()
    try:
        assert completion_error(server, "salted", KEY_A)[0] == 404
        assert httpx.post(server.url + "/v1/completions", json={"model": "salted", **COMPLETION}, headers=KEY_B,
                          timeout=60).status_code == 200
        # the keys file: a salted key for a new tenant, beside a legacy digest
        keys = json.loads(original)
        keys["tenant-c"] = [salted_key_hash("key-c", salt="saltofthisfile"), f"sha256:{hash_api_key('key-d')}"]
        replace_file(assets.keys_file, json.dumps(keys))
        for key in ("key-c", "key-d"):
            wait_until(lambda: httpx.get(server.url + "/v1/models", headers=auth(key)).status_code == 200, 15,
                       f"{key} accepted")
        assert_error(httpx.get(server.url + "/v1/models", headers=auth("key-e")), 401, "invalid_api_key")
    finally:
        replace_file(assets.keys_file, original)
        httpx.delete(url, headers=ADMIN, timeout=30)
    wait_until(lambda: httpx.get(server.url + "/v1/models", headers=auth("key-c")).status_code == 401, 15,
               "key-c gone with the file's old contents")
