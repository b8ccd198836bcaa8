"""Salted API key hashes (loraplex.manifest): the stored form, matching, and what matching
costs per request (one PBKDF2 derivation per new key and salt, then a cache hit)."""
from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from loraplex import manifest as M
from loraplex.engine.api.auth import parse_api_keys


def test_a_salted_hash_matches_its_key_only():
    entry = M.salted_key_hash("sk-tenant-key")
    algo, iterations, salt, digest = entry.split("$")
    assert (algo, int(iterations)) == ("pbkdf2_sha256", M.KEY_HASH_ITERATIONS) and len(salt) >= 16 and len(digest) == 64
    assert M.key_matches(M.hash_api_key("sk-tenant-key"), [entry])
    assert not M.key_matches(M.hash_api_key("sk-other-key"), [entry])
    assert not M.key_matches(None, [entry])
    # random salts: the same key never gives the same stored hash twice (no linking across deployments)
    assert M.salted_key_hash("sk-tenant-key") != entry
    assert M.salted_key_hash("k", salt="fixedsalt") == M.salted_key_hash("k", salt="fixedsalt")
    # the legacy plain digest still matches (deprecated)
    assert M.key_matches(M.hash_api_key("k"), ["0" * 64, M.hash_api_key("k")])


@pytest.mark.parametrize("tenant", [
    "raw-key", "pbkdf2_sha256$0$saltsalt$" + "0" * 64, "pbkdf2_sha256$2000000$saltsalt$" + "0" * 64,
    "pbkdf2_sha256$1000$short$" + "0" * 64, "pbkdf2_sha256$1000$salt salt$" + "0" * 64,
    "pbkdf2_sha256$1000$saltsalt$" + "0" * 63, "scrypt$1000$saltsalt$" + "0" * 64])
def test_manifests_refuse_anything_but_a_key_hash(tenant):
    with pytest.raises(ValidationError, match="never raw keys"):
        M.AdapterManifest(name="a", uri="a", tenants=[tenant])


def test_manifests_take_both_forms():
    tenants = [M.salted_key_hash("a"), M.hash_api_key("b")]
    assert M.AdapterManifest(name="a", uri="a", tenants=tenants).tenants == tenants


def test_matching_costs_one_derivation_per_new_key_and_salt(monkeypatch):
    calls = []
    pbkdf2 = hashlib.pbkdf2_hmac

    def counting(*args, **kwargs):
        calls.append(args)
        return pbkdf2(*args, **kwargs)

    salt = "oneSaltForTheFile"
    keys = {f"tenant-{i}": [M.salted_key_hash(f"sk-{i}", salt=salt)] for i in range(50)}
    keys["legacy"] = [f"sha256:{M.hash_api_key('sk-legacy')}"]
    index = parse_api_keys(json.dumps(keys))
    M._derive.cache_clear()
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    for _ in range(100):  # a tenant's requests: the first derives, the others hit the cache
        assert index.get(M.hash_api_key("sk-7")) == "tenant-7"
    assert len(calls) == 1
    assert index.get(M.hash_api_key("sk-legacy")) == "legacy" and len(calls) == 1  # plain: no derivation
    assert index.get(M.hash_api_key("sk-unknown")) is None and len(calls) == 2  # one per new key, not per entry
    # a manifest's tenants, same salt: one derivation for the key, whatever the list's length
    tenants = [M.salted_key_hash(f"sk-{i}", salt=salt) for i in range(50)]
    calls.clear()
    assert M.key_matches(M.hash_api_key("sk-49"), tenants) and not M.key_matches(M.hash_api_key("sk-x"), tenants)
    assert len(calls) == 1  # sk-49's hash for this salt was derived when the list was made; sk-x is new


def test_the_keys_file_refuses_a_malformed_salted_key():
    with pytest.raises(ValueError, match="pbkdf2_sha256"):
        parse_api_keys('{"t": ["pbkdf2_sha256$1000$x$y"]}')
    with pytest.raises(ValueError, match="two tenants"):
        entry = M.salted_key_hash("k")
        parse_api_keys(json.dumps({"t1": [entry], "t2": [entry]}))
