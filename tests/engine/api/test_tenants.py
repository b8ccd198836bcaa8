"""Tenant settings in the API keys file (both forms) and who a request belongs to
(`Principal.tenant`): the key's tenant, `admin`, the gateway's fairness header, or `default`."""
from __future__ import annotations

import json

import pytest
from starlette.requests import Request

from loraplex.engine.api.auth import Authenticator, parse_api_keys
from loraplex.engine.api.errors import APIError
from loraplex.engine.api.tenants import (ADMIN_TENANT, DEFAULT_TENANT, GATEWAY_TENANT_HEADER, UNLIMITED, TenantLimits,
                                         TenantSettings, tenant_from_gateway)
from loraplex.manifest import hash_api_key, salted_key_hash


def request(token: str | None = None, **headers: str) -> Request:
    raw = [(k.replace("_", "-").encode(), v.encode("latin-1")) for k, v in headers.items()]
    if token is not None:
        raw.append((b"authorization", f"Bearer {token}".encode()))
    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": raw})


def test_both_forms_in_one_file():
    table = parse_api_keys(json.dumps({
        "old-list": ["sk-1", f"sha256:{hash_api_key('sk-2')}"],
        "old-one": "sk-3",
        "new": {"keys": ["sk-4", salted_key_hash("sk-5")], "weight": 2.5,
                "limits": {"requests_per_minute": 600, "tokens_per_minute": 200000, "max_concurrent": 16}},
        "new-one-key": {"keys": "sk-6"},
        "new-partial": {"keys": ["sk-7"], "limits": {"max_concurrent": 1, "tokens_per_minute": None}},
    }))
    owners = {k: table.get(hash_api_key(k)) for k in ("sk-1", "sk-2", "sk-3", "sk-4", "sk-5", "sk-6", "sk-7")}
    assert owners == {"sk-1": "old-list", "sk-2": "old-list", "sk-3": "old-one", "sk-4": "new", "sk-5": "new",
                      "sk-6": "new-one-key", "sk-7": "new-partial"}
    assert hash_api_key("sk-4") in table and hash_api_key("sk-x") not in table and table.get(None) is None
    assert table.settings_of("new") == TenantSettings(2.5, TenantLimits(600, 200000, 16))
    assert table.settings_of("new-partial") == TenantSettings(1.0, TenantLimits(max_concurrent=1))
    assert table.settings_of("old-list") == UNLIMITED == table.settings_of("new-one-key")
    assert table.settings_of("not-in-the-file") == UNLIMITED
    assert not UNLIMITED.limits.any() and table.settings_of("new").limits.any()


@pytest.mark.parametrize("entry,message", [
    ({"keys": ["k"], "wieght": 2}, "unknown field 'wieght' (allowed: keys, weight, limits)"),
    ({"keys": ["k"], "limits": {"rpm": 1, "tpm": 2}}, "tenant 't': limits: unknown fields 'rpm', 'tpm'"),
    ({"weight": 2}, "'keys' is required"),
    ({"keys": []}, None),  # a tenant with no keys (yet): allowed, as a list always was
    ({"keys": [""]}, "keys must be a non-empty string or a list of them"),
    ({"keys": ["k"], "weight": 0}, "weight must be a number > 0, got 0"),
    ({"keys": ["k"], "weight": -1.5}, "weight must be a number > 0"),
    ({"keys": ["k"], "weight": "2"}, 'weight must be a number > 0, got "2"'),
    ({"keys": ["k"], "weight": True}, "weight must be a number > 0, got true"),
    ({"keys": ["k"], "limits": {"requests_per_minute": 0}}, "limits.requests_per_minute must be a positive integer"),
    ({"keys": ["k"], "limits": {"tokens_per_minute": 1.5}}, "limits.tokens_per_minute must be a positive integer "
                                                           "or null, got 1.5"),
    ({"keys": ["k"], "limits": {"max_concurrent": "16"}}, "limits.max_concurrent must be a positive integer"),
    ({"keys": ["k"], "limits": {"max_concurrent": False}}, "limits.max_concurrent must be a positive integer"),
    ({"keys": ["k"], "limits": [600]}, "limits must be an object"),
    ({"keys": ["sha256:abc"]}, "'sha256:' must be followed by 64 hex characters"),
    ({"keys": ["pbkdf2_sha256$1$x$y"]}, "a 'pbkdf2_sha256$' key must be"),
    (42, "keys must be a non-empty string or a list of them"),
])
def test_bad_tenant_entries_are_refused_by_name(entry, message):
    text = json.dumps({"t": entry})
    if message is None:
        assert parse_api_keys(text).settings_of("t") == UNLIMITED
        return
    with pytest.raises(ValueError) as exc:
        parse_api_keys(text)
    assert message in str(exc.value) and "'t'" in str(exc.value), str(exc.value)


@pytest.mark.parametrize("text,message", [
    ("[]", "must hold a JSON object"),
    ("{", "not valid JSON"),
    (json.dumps({"admin": ["k"]}), "reserved for the admin token"),
    (json.dumps({"x" * 129: ["k"]}), "longer than 128 characters"),
    (json.dumps({"bad\nname": ["k"]}), "control characters"),
    (json.dumps({" padded": ["k"]}), "spaces at an end"),
    (json.dumps({"a": {"keys": ["same"]}, "b": ["same"]}), "one key is listed for two tenants ('a' and 'b')"),
])
def test_bad_files(text, message):
    with pytest.raises(ValueError, match=None) as exc:
        parse_api_keys(text)
    assert message in str(exc.value), str(exc.value)


@pytest.fixture
def files(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"team-a": {"keys": ["key-a"], "weight": 3, "limits": {"max_concurrent": 2}},
                                "team-b": "key-b"}))
    admin = tmp_path / "admin.txt"
    admin.write_text("admin-token\n")
    return keys, admin


def test_principal_with_keys(files):
    keys, admin = files
    auth = Authenticator(str(keys), str(admin))
    a = auth.inference(request("key-a"))
    assert (a.tenant, a.is_admin, a.settings) == ("team-a", False, TenantSettings(3.0, TenantLimits(max_concurrent=2)))
    b = auth.inference(request("key-b", **{GATEWAY_TENANT_HEADER: "someone-else"}))  # the key decides
    assert (b.tenant, b.settings) == ("team-b", UNLIMITED)
    root = auth.inference(request("admin-token"))
    assert (root.tenant, root.is_admin, root.settings) == (ADMIN_TENANT, True, UNLIMITED)
    assert auth.require_admin(request("admin-token")).tenant == ADMIN_TENANT
    for token, code in ((None, "missing_api_key"), ("nope", "invalid_api_key")):
        with pytest.raises(APIError) as exc:
            auth.inference(request(token))
        assert (exc.value.status, exc.value.code) == (401, code)
    assert auth.tenants() == {"team-a": TenantSettings(3.0, TenantLimits(max_concurrent=2)), "team-b": UNLIMITED}
    assert auth.is_configured("team-b") and not auth.is_configured(DEFAULT_TENANT)


def test_settings_follow_a_reload(files):
    keys, admin = files
    auth = Authenticator(str(keys), str(admin))
    keys.write_text(json.dumps({"team-a": {"keys": ["key-a"], "limits": {"requests_per_minute": 5}}}))
    auth.reload()
    assert auth.inference(request("key-a")).settings == TenantSettings(1.0, TenantLimits(requests_per_minute=5))
    keys.write_text(json.dumps({"team-a": {"keys": ["key-a"], "weight": -1}}))  # bad: the last good one stays
    auth.reload()
    assert auth.inference(request("key-a")).settings.limits.requests_per_minute == 5


def test_principal_without_keys(files):
    _, admin = files
    auth = Authenticator(None, str(admin))
    assert auth.inference(request()).tenant == DEFAULT_TENANT
    assert auth.inference(request("any-token")).tenant == DEFAULT_TENANT
    gw = auth.inference(request(**{GATEWAY_TENANT_HEADER: " team-x "}))
    assert (gw.tenant, gw.settings, gw.is_admin) == ("team-x", UNLIMITED, False)
    assert auth.inference(request(**{GATEWAY_TENANT_HEADER: ""})).tenant == DEFAULT_TENANT
    assert auth.inference(request("admin-token", **{GATEWAY_TENANT_HEADER: "team-x"})).tenant == ADMIN_TENANT
    for bad in ("x" * 129, "tab\there", "caf\u00e9", ADMIN_TENANT):
        with pytest.raises(APIError) as exc:
            auth.inference(request(**{GATEWAY_TENANT_HEADER: bad}))
        assert (exc.value.status, exc.value.code) == (400, "invalid_tenant")
        assert GATEWAY_TENANT_HEADER in exc.value.message
    assert auth.tenants() == {} and not auth.is_configured("team-x")


def test_gateway_names():
    assert tenant_from_gateway(None) == tenant_from_gateway("  ") == DEFAULT_TENANT
    assert tenant_from_gateway("x" * 128) == "x" * 128
    assert tenant_from_gateway("team a/1") == "team a/1"
    with pytest.raises(ValueError, match="longer than 128"):
        tenant_from_gateway("x" * 129)
