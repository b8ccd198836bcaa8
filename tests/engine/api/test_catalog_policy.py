"""Who may load adapters by name: tenant keys and registered tenants (docs/api.md "Adapters by name")."""
from __future__ import annotations

import httpx

from loraplex.manifest import hash_api_key
from tests.engine.api.conftest import ADMIN, KEY_A, KEY_B, assert_error, shutil_copy_adapter

PROMPT = "Hello"


def ask(server, key: dict, model: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", headers=key, timeout=120,
                      json={"model": model, "prompt": PROMPT, "max_tokens": 2})


def test_any_valid_key_loads_by_name_but_registered_tenants_still_hold(server, assets):
    # a folder nobody registered: any valid key may load it by name; no key is a 401 first
    shutil_copy_adapter(assets, "a1", "shared-by-name")
    assert ask(server, KEY_B, "shared-by-name").status_code == 200
    assert_error(ask(server, {}, "shared-by-name"), 401, "missing_api_key")
    # a folder registered with tenants: its files stay private under any name that reaches them
    shutil_copy_adapter(assets, "a2", "vault-files")
    put = httpx.put(server.url + "/v1/adapters/vault", headers=ADMIN, timeout=30,
                    json={"uri": "vault-files", "tenants": [hash_api_key("key-a")]})
    assert put.status_code == 200, put.text
    try:
        # to another tenant the adapter does not exist (docs/api.md "Authentication and tenants")
        assert_error(ask(server, KEY_B, "vault-files"), 404, "model_not_found")
        assert_error(ask(server, KEY_B, "vault-files/."), 404, "model_not_found")  # same folder, other spelling
        ok = ask(server, KEY_A, "vault-files")
        assert ok.status_code == 200 and ok.json()["model"] == "vault-files"
        listed = {m["id"] for m in httpx.get(server.url + "/v1/models", headers=KEY_B).json()["data"]}
        assert "vault" not in listed and "vault-files" not in listed
    finally:
        httpx.delete(server.url + "/v1/adapters/vault", headers=ADMIN, timeout=30)
