"""The operator's Kubernetes client (operator/loraplex/operator/kube.py over kubernetes_asyncio) against a real HTTP
server on loopback (fake_api.FakeApi): retries of 429/5xx with backoff and Retry-After, error
mapping, content types, the status subresource, discovery, and login from a kubeconfig."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import certifi
import pytest
import yaml

from loraplex.operator import handlers, kube
from loraplex.operator.apply import ensure
from loraplex.operator.kube import JSON_PATCH, ApiError, KubeClient, Ref

from .fake_api import TOKEN, FakeApi

NS = "t"
CM = Ref("v1", "configmaps", NS, "cm")
ADAPTER = Ref("loraplex.dev/v1alpha1", "loraadapters", NS, "a")


def run(coro):
    return asyncio.run(coro)


def adapter() -> dict:
    return {"apiVersion": "loraplex.dev/v1alpha1", "kind": "LoraAdapter",
            "metadata": {"name": "a", "namespace": NS}, "spec": {"baseModel": "b"}}


async def with_api(fn, served=frozenset(), **client_kwargs):
    api = FakeApi(served=set(served))
    client = await api.client(**client_kwargs)
    client.BACKOFF_BASE = 0.01  # keep the tests quick; Retry-After is honoured as sent
    try:
        return await fn(api, client)
    finally:
        await client.aclose()
        await api.aclose()


def test_crud_round_trip_with_merge_patch_and_status_subresource():
    async def body(api: FakeApi, c: KubeClient):
        assert await c.get(ADAPTER) is None
        created = await c.create(ADAPTER, adapter())
        assert created["spec"] == {"baseModel": "b"}
        await c.patch(ADAPTER, {"metadata": {"labels": {"x": "1"}}})
        # A status write goes to /status, and the fake API (as a real one) takes only status there.
        await c.patch_status(ADAPTER, {"phase": "Ready"})
        got = await c.get(ADAPTER)
        assert got["metadata"]["labels"] == {"x": "1"} and got["status"] == {"phase": "Ready"}
        assert [o["metadata"]["name"] for o in await c.list(Ref(ADAPTER.api_version, ADAPTER.plural, NS))] == ["a"]
        assert await c.delete(ADAPTER) is True
        assert await c.delete(ADAPTER) is False
        return api

    api = run(with_api(body))
    assert api.requests["PATCH loraadapters/status"] == 1 and api.requests["PATCH loraadapters"] == 1
    assert api.content_types["PATCH application/merge-patch+json"] == 2
    assert api.content_types["POST application/json"] == 1
    assert api.queries["PATCH fieldManager=loraplex-operator"] == 2


def test_json_patch_test_operation_is_a_compare_and_swap():
    async def body(api: FakeApi, c: KubeClient):
        await c.create(ADAPTER, adapter())
        await c.patch(ADAPTER, [{"op": "test", "path": "/spec/baseModel", "value": "b"},
                                {"op": "replace", "path": "/spec/baseModel", "value": "c"}], content_type=JSON_PATCH)
        with pytest.raises(ApiError) as e:
            await c.patch(ADAPTER, [{"op": "test", "path": "/spec/baseModel", "value": "b"},
                                    {"op": "replace", "path": "/spec/baseModel", "value": "d"}],
                          content_type=JSON_PATCH)
        assert e.value.status == 422
        assert (await c.get(ADAPTER))["spec"]["baseModel"] == "c"
        return api

    api = run(with_api(body))
    assert api.content_types["PATCH application/json-patch+json"] == 2


def test_throttling_and_server_errors_are_retried_honouring_retry_after():
    async def body(api: FakeApi, c: KubeClient):
        await c.create(CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "namespace": NS}})
        api.fail(429, retry_after="1")
        api.fail(503)
        api.fail(500)
        before = api.received
        t0 = time.monotonic()
        got = await c.get(CM)
        return got, api.received - before, time.monotonic() - t0

    got, requests, elapsed = run(with_api(body))
    assert got["metadata"]["name"] == "cm"
    assert requests == 4, "three failures, then the answer"
    assert elapsed >= 1.0, "Retry-After: 1 was honoured"


def test_retries_are_bounded_and_end_in_the_servers_error():
    async def body(api: FakeApi, c: KubeClient):
        api.fail(503, times=c.RETRIES + 5)
        before = api.received
        with pytest.raises(ApiError) as e:
            await c.patch_status(ADAPTER, {"phase": "Ready"})
        return e.value, api.received - before

    err, requests = run(with_api(body))
    assert requests == KubeClient.RETRIES + 1
    assert err.status == 503 and err.reason == "Injected" and err.message == "injected 503"
    assert isinstance(err, kube.k8s.ApiException), "callers may catch the library's exception"


def test_client_errors_are_not_retried_and_carry_the_status_message():
    async def body(api: FakeApi, c: KubeClient):
        await c.create(ADAPTER, adapter())
        before = api.received
        with pytest.raises(ApiError) as e:
            await c.create(ADAPTER, adapter())
        assert api.received - before == 1, "a 409 is the caller's to handle (re-read), never retried"
        assert e.value.status == 409 and e.value.reason == "AlreadyExists"
        assert "already exists" in e.value.message
        # A body over the API server's limits: 422 with the server's message, not retried.
        big = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big", "namespace": NS},
               "data": {"k": "x" * (1 << 20)}}
        with pytest.raises(ApiError) as e2:
            await c.create(Ref("v1", "configmaps", NS, "big"), big)
        assert e2.value.status == 422 and "too long" in e2.value.message
        # An unsupported patch type answers 415 (nothing in the operator sends one).
        with pytest.raises(ApiError) as e3:
            await c.patch(ADAPTER, {"spec": {}}, content_type="application/apply-patch+yaml")
        assert e3.value.status == 415

    run(with_api(body))


def test_an_unreachable_server_is_retried_then_reported_as_503():
    async def body():
        api = FakeApi()
        url = await api.start()
        await api.aclose()  # nothing listens there any more
        c = KubeClient.for_server(url, token=TOKEN)
        c.BACKOFF_BASE = 0.01
        try:
            with pytest.raises(ApiError) as e:
                await c.get(CM)
        finally:
            await c.aclose()
        return e.value

    err = run(body())
    assert err.status == 503 and err.reason == "Unreachable"


def test_discovery_says_whether_a_crd_is_served():
    async def body(api: FakeApi, c: KubeClient):
        return (await c.has_resource("inference.networking.k8s.io/v1", "inferencepools"),
                await c.has_resource("inference.networking.k8s.io/v1", "other"),
                await c.has_resource("gateway.example/v1", "inferencepools"))

    assert run(with_api(body, served={"inference.networking.k8s.io/v1/inferencepools"})) == (True, False, False)


def test_apply_ensure_creates_then_leaves_an_unchanged_object_alone():
    async def body(api: FakeApi, c: KubeClient):
        desired = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "namespace": NS},
                   "data": {"a": "1"}}
        first = await ensure(c, desired)
        writes = api.writes()
        second = await ensure(c, desired)
        third = await ensure(c, {**desired, "data": {"b": "2"}})
        return first, second, api.writes() - writes, third, (await c.get(CM))["data"]

    first, second, writes, third, data = run(with_api(body))
    assert (first, second, third) == ("created", "unchanged", "patched")
    assert writes == 1 and data == {"b": "2"}, "the key the operator no longer sets was removed"


def test_login_from_a_kubeconfig_serves_kopf_and_the_client(tmp_path, monkeypatch):
    """handlers.login: kubernetes_asyncio loads the kubeconfig; kopf gets the same credentials."""
    async def body():
        api = FakeApi()
        url = await api.start()
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": url}}],
            "users": [{"name": "u", "user": {"token": TOKEN}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        configuration = await kube.load_configuration()
        info = await handlers.connection_info(configuration)
        c = KubeClient(configuration)
        try:
            await c.create(CM, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "namespace": NS}})
            got = await c.get(CM)
        finally:
            await c.aclose()
            await api.aclose()
        return url, info, got

    url, info, got = run(body())
    assert got is not None, "the token from the kubeconfig was sent (the fake API answers 401 without it)"
    assert (info.server, info.scheme, info.token) == (url, "Bearer", TOKEN)


def test_login_without_credentials_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kube.ConfigException):
        run(kube.load_configuration())


def test_in_cluster_service_account_is_preferred_and_its_rotated_token_is_used(tmp_path, monkeypatch):
    """In a pod: the service account wins over any kubeconfig, kopf gets its token and CA, and the
    client picks up the token the kubelet rotates into the file without a new login."""
    from kubernetes_asyncio.config import incluster_config

    token_file, ca_file = tmp_path / "token", tmp_path / "ca.crt"
    token_file.write_text("stale-token")
    ca_file.write_text(Path(certifi.where()).read_text())  # any valid CA bundle: loaded, never used (HTTP)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token_file))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca_file))
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", incluster_config.datetime.timedelta(0))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))

    async def body():
        configuration = await kube.load_configuration()
        info = await handlers.connection_info(configuration)
        api = FakeApi()
        configuration.host = await api.start()  # the fake API speaks plain HTTP on loopback
        c = KubeClient(configuration)
        try:
            with pytest.raises(ApiError) as e:
                await c.get(CM)
            token_file.write_text(TOKEN)  # the kubelet rotates the projected token
            assert await c.get(CM) is None  # 404 as None: authenticated this time
        finally:
            await c.aclose()
            await api.aclose()
        return info, e.value

    info, err = run(body())
    assert (info.server, info.scheme, info.token, info.ca_path) == (
        "https://10.0.0.1:443", "Bearer", "stale-token", str(ca_file))
    assert err.status == 401
