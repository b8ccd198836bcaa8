"""LoraAdapter -> manifest, and the per-pod push decisions (pure functions)."""
from __future__ import annotations

import base64

import httpx
import pytest

from loraplex.manifest import hash_api_key, key_matches, salted_key_hash
from loraplex.operator import adapters as A
from loraplex.operator import constants as C
from loraplex.operator.engine_client import EngineClient, EngineError, EngineUnreachable, boot_id_of

def secret(**data: str) -> dict:
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


# --- manifest building -------------------------------------------------------------------------

def test_manifest_from_spec():
    spec = {"baseModel": "llama", "source": {"type": "hub", "uri": "org/adapter", "revision": "v1",
                                             "sha256": "A" * 64, "configSha256": "b" * 64}, "preload": True}
    m = A.build_manifest("support-acme", spec, [])
    assert (m.name, m.source, m.uri, m.revision, m.preload) == ("support-acme", "hub", "org/adapter", "v1", True)
    assert m.sha256 == "a" * 64 and m.config_sha256 == "b" * 64
    assert A.manifest_json(m)["config_sha256"] == "b" * 64
    assert A.manifest_json(m)["tenants"] == []


@pytest.mark.parametrize("source, fragment", [
    ({"type": "s3", "uri": "org/repo"}, "s3://bucket"),
    ({"type": "hub", "uri": "s3://bucket/x"}, "repo id"),
    ({"type": "local", "uri": "/x", "revision": "main"}, "revision"),
    ({"type": "s3", "uri": "s3://bucket/../../x"}, "'..' path segment"),
    ({"type": "s3", "uri": "s3://bucket/%2e%2e/x"}, "'%'"),
    ({"type": "local", "uri": "a\\..\\b"}, "backslash"),
    ({"type": "hub", "uri": "org/name", "revision": "../../x"}, "'..' path segment"),
])
def test_source_must_fit_its_type(source, fragment):
    with pytest.raises(A.SpecProblem) as e:
        A.build_manifest("a", {"source": source}, [])
    assert e.value.reason == "InvalidSource" and fragment in e.value.message


def test_validate():
    A.validate("ok-name", {"baseModel": "b", "rank": 16}, {"engine": {"maxLoraRank": 16}})
    with pytest.raises(A.SpecProblem, match="DNS-1123") as e:
        A.validate("Bad_Name", {}, {})
    assert e.value.reason == "InvalidName"
    with pytest.raises(A.SpecProblem) as e:
        A.validate("a", {"baseModel": "nope"}, None)
    assert e.value.reason == "BaseNotFound"
    with pytest.raises(A.SpecProblem, match="exceeds maxLoraRank 16") as e:
        A.validate("a", {"baseModel": "b", "rank": 64}, {"engine": {"maxLoraRank": 16}})
    assert e.value.reason == "RankTooLarge"
    A.validate("a", {"baseModel": "b", "rank": 64}, {"engine": {}})  # limit unknown: accepted


def test_tenants_are_salted_hashes_of_the_secret_keys():
    refs = A.api_key_refs({"access": {"apiKeySecretRefs": [{"name": "one", "key": "k"}, {"name": "all"}]}})
    salt = A.tenant_salt("team-a", "llama")
    hashes = A.tenant_hashes(refs, {"one": secret(k="key-1\n", other="ignored"),
                                    "all": secret(a="key-2", b="key-3")}, salt)
    assert hashes == sorted(salted_key_hash(k, salt) for k in ("key-1", "key-2", "key-3"))
    assert all(h.startswith(f"pbkdf2_sha256$1000${salt}$") for h in hashes)
    assert not any(k in "".join(hashes) for k in ("key-1", "key-2"))
    assert key_matches(hash_api_key("key-2"), hashes) and not key_matches(hash_api_key("other"), hashes)
    # one salt per base: stable across passes, different for another base or namespace
    assert A.tenant_salt("team-a", "llama") == salt
    assert len({salt, A.tenant_salt("team-b", "llama"), A.tenant_salt("team-a", "qwen")}) == 3


@pytest.mark.parametrize("secrets, reason", [
    ({}, "SecretNotFound"),
    ({"one": None}, "SecretNotFound"),
    ({"one": secret(other="x")}, "SecretKeyNotFound"),
    ({"one": {"data": {"k": "!!!not-base64"}}}, "InvalidSecret"),
    ({"one": secret(k="  ")}, "InvalidSecret"),
])
def test_tenants_fail_closed(secrets, reason):
    refs = [A.SecretKeyRef("one", "k")]
    with pytest.raises(A.SpecProblem) as e:
        A.tenant_hashes(refs, secrets, "salt-of-the-base")
    assert e.value.reason == reason


def test_digest_changes_with_the_manifest_only():
    m1 = A.build_manifest("a", {"source": {"type": "hub", "uri": "o/r"}}, [])
    m2 = A.build_manifest("a", {"source": {"type": "hub", "uri": "o/r"}}, [])
    m3 = A.build_manifest("a", {"source": {"type": "hub", "uri": "o/r2"}}, [])
    assert A.manifest_digest(m1) == A.manifest_digest(m2) != A.manifest_digest(m3)


# --- the engine client's reading of the contract's shapes --------------------------------------

@pytest.mark.asyncio
async def test_engine_client_reads_states_and_openai_errors():
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/info":
            return httpx.Response(200, json={"boot_id": "b-1", "model_id": "m"})
        if request.method == "PUT" and path == "/v1/adapters/bad":
            return httpx.Response(422, json={"error": {"message": "use_dora is not supported", "type": "invalid",
                                                       "param": None, "code": None}})
        if request.method == "PUT":
            return httpx.Response(200, json={"name": "good", "state": "loading", "message": ""})
        if request.method == "GET" and path == "/v1/adapters":
            return httpx.Response(200, json={"object": "list", "data": [{"name": "good", "state": "host"}]})
        if request.method == "GET" and path == "/v1/adapters/gone":
            return httpx.Response(404, json={"error": {"message": "unknown adapter"}})
        if request.method == "DELETE":
            return httpx.Response(404, json={"error": {"message": "unknown adapter"}})
        return httpx.Response(500, text="boom")

    client = EngineClient(transport=httpx.MockTransport(handler))
    try:
        assert boot_id_of(await client.info("10.0.0.1", 8080)) == "b-1"
        rep = await client.put_adapter("10.0.0.1", 8080, {"name": "good", "source": "hub", "uri": "o/r"})
        assert rep.state == "loading"
        with pytest.raises(EngineError) as e:
            await client.put_adapter("10.0.0.1", 8080, {"name": "bad", "source": "hub", "uri": "o/r"})
        assert (e.value.status, e.value.message, e.value.transient) == (422, "use_dora is not supported", False)
        assert await client.get_adapter("10.0.0.1", 8080, "gone") is None
        assert [a["name"] for a in await client.list_adapters("10.0.0.1", 8080)] == ["good"]
        assert await client.delete_adapter("10.0.0.1", 8080, "gone") is False
        with pytest.raises(EngineError) as e:
            await client.metrics("10.0.0.1", 8080)
        assert e.value.transient
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_engine_client_unreachable():
    client = EngineClient(timeout=1, connect_timeout=0.5)
    try:
        with pytest.raises(EngineUnreachable):
            await client.info("127.0.0.1", 9)  # discard port: nothing listens
    finally:
        await client.aclose()


def test_admin_token():
    assert A.admin_token_ref({"engine": {}}, "llama") == A.SecretKeyRef("llama-admin-token", "token"), \
        "without a named Secret the engines use the one the operator creates: never open"
    ref = A.admin_token_ref({"engine": {"adminTokenSecretRef": {"name": "adm"}}}, "llama")
    assert ref == A.SecretKeyRef("adm", "token")
    assert A.admin_token(ref, secret(token="s3cret\n")) == "s3cret"
    with pytest.raises(A.SpecProblem) as e:
        A.admin_token(ref, None)
    assert e.value.reason == "SecretNotFound"
    with pytest.raises(A.SpecProblem) as e:
        A.admin_token(ref, secret(other="x"))
    assert e.value.reason == "SecretKeyNotFound"
    assert EngineError(401, "bad token").transient, "a refused token is not the adapter's failure"
