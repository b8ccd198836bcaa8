"""The operator's adapter catalog (operator/loraplex/operator/catalog.py) over HTTP: the real operator against kmock.

- the engines' Deployment carries --adapter-catalog-url for its base (LORAPLEX_CATALOG_URL set);
- GET /catalog/v1/{ns}/{base}/adapters/{name} with the base's admin token answers the manifest the
  operator pushes (tenant key hashes, never the keys); no token 401; another base's token, a
  wrong token or an unknown base 403; an adapter of another base or none 404; an adapter that
  cannot be served 409 with the reason;
- a standby operator (waiting for the Lease) answers the same, and every API request either
  made is granted by the chart's RBAC.
The engine's side (a request on a pod the adapter is not placed on) is in test_fleet_integration.py
and tests/engine/api/test_operator_catalog.py.
"""
from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

from loraplex.manifest import salted_key_hash
from loraplex.operator.adapters import tenant_salt

from .harness import FakeCluster, OperatorProcess, free_port, wait_for

pytestmark = pytest.mark.slow

NS = "cat-ns"
API = "loraplex.dev/v1alpha1"
ENV = {"LORAPLEX_RESYNC_INTERVAL": "1", "LORAPLEX_POLL_INTERVAL": "0.2"}


def operator(c: FakeCluster, tmp, name: str) -> tuple[OperatorProcess, str]:
    port = free_port(["127.0.0.1"])
    url = f"http://127.0.0.1:{port}"
    env = {**ENV, "LORAPLEX_CATALOG_PORT": str(port), "LORAPLEX_CATALOG_ADDR": "127.0.0.1",
           "LORAPLEX_CATALOG_URL": url, "LORAPLEX_CATALOG_REFRESH_INTERVAL": "0.5"}
    return OperatorProcess(c.kubeconfig, tmp / f"{name}.log", env=env, name=name).start(), url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("operator-catalog")
    with FakeCluster() as c:
        c.kubeconfig = c.write_kubeconfig(tmp / "kubeconfig")  # type: ignore[attr-defined]
        c.tmp = tmp  # type: ignore[attr-defined]
        c.operators = []  # type: ignore[attr-defined]
        try:
            yield c
        finally:
            for op in c.operators:  # type: ignore[attr-defined]
                op.stop()


def lora(name: str, base: str, **spec) -> dict:
    return {"apiVersion": API, "kind": "LoraAdapter", "metadata": {"name": name, "namespace": NS},
            "spec": {"baseModel": base, "source": {"type": "hub", "uri": f"org/{name}"}, **spec}}


def get(url: str, ns: str, base: str, name: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(f"{url}/catalog/v1/{ns}/{base}/adapters/{name}", headers=headers, timeout=10, trust_env=False)


def code(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def test_catalog_answers_manifests_to_the_bases_engines_only(cluster: FakeCluster):
    c = cluster
    op, url = operator(c, c.tmp, "operator-a")  # type: ignore[attr-defined]
    c.operators.append(op)  # type: ignore[attr-defined]
    c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "namespace": NS}})
    c.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": NS},
              "data": {"k": base64.b64encode(b"sk-raw-tenant-key").decode()}})
    for base in ("base", "other"):
        c.create({"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {"name": base, "namespace": NS},
                  "spec": {"model": {"id": "org/model"}, "replicas": 1, "engine": {"maxLoraRank": 16}}})
    c.create(lora("keyed", "base", access={"apiKeySecretRefs": [{"name": "keys", "key": "k"}]},
                  placement={"replicas": 1}))
    c.create(lora("too-big", "base", rank=64))  # above maxLoraRank: never servable
    c.create(lora("elsewhere", "other"))
    tokens = {}
    for base in ("base", "other"):
        s = wait_for(lambda: c.get("v1", "secrets", NS, f"{base}-admin-token"), 30, "admin Secret", on_timeout=op.log)
        tokens[base] = base64.b64decode(s["data"]["token"]).decode()
    dep = wait_for(lambda: c.get("apps/v1", "deployments", NS, "base"), 30, "Deployment", on_timeout=op.log)
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--adapter-catalog-url") + 1] == f"{url}/catalog/v1/{NS}/base"

    r = wait_for(lambda: (r := get(url, NS, "base", "keyed", tokens["base"])).status_code == 200 and r, 30,
                 "the manifest of keyed", on_timeout=op.log)
    # Served by revisions, as on its placed pods (revision 1 here: no engine pod reported it yet).
    assert r.json() == {"name": "keyed", "source": "hub", "uri": "org/keyed", "preload": False,
                        "tenants": [salted_key_hash("sk-raw-tenant-key", tenant_salt(NS, "base"))],
                        "revisions": [{"number": 1, "percent": 100, "source": "hub", "uri": "org/keyed"}]}
    assert "sk-raw-tenant-key" not in r.text
    # A burst of lookups (pods asking at once) costs at most one read of each object: cached 2 s.
    def reads(path: str) -> int:
        return sum(1 for q in c.requests() if str(getattr(q.method, "value", q.method)).upper() == "GET"
                   and q.url.path.endswith(path))
    before = (reads("/loraadapters/keyed"), reads("/basemodeldeployments/base"))
    for _ in range(5):
        assert get(url, NS, "base", "keyed", tokens["base"]).status_code == 200
    after = (reads("/loraadapters/keyed"), reads("/basemodeldeployments/base"))
    assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1, (before, after)
    assert code(get(url, NS, "base", "keyed", None)) == (401, "missing_token")
    assert code(get(url, NS, "base", "keyed", "not-the-token")) == (403, "forbidden")
    assert code(get(url, NS, "base", "keyed", tokens["other"])) == (403, "forbidden")  # another base's engines
    assert code(get(url, NS, "nobase", "keyed", tokens["base"])) == (403, "forbidden")  # no base: same answer
    assert code(get(url, "elsewhere-ns", "base", "keyed", tokens["base"])) == (403, "forbidden")
    assert code(get(url, NS, "base", "missing", tokens["base"])) == (404, "model_not_found")
    assert code(get(url, NS, "base", "elsewhere", tokens["base"])) == (404, "model_not_found")  # other base's
    assert get(url, NS, "other", "elsewhere", tokens["other"]).status_code == 200
    refused = get(url, NS, "base", "too-big", tokens["base"])
    assert code(refused)[0] == 409 and "maxLoraRank" in refused.json()["error"]["message"]
    for bad in ("..%2Fkeyed", "Keyed", "a.b"):  # never reaches the API as a path
        assert code(get(url, NS, "base", bad, tokens["base"])) == (404, "model_not_found")
    assert code(get(url, NS, "base.x%2F..", "keyed", tokens["base"])) == (403, "forbidden")

    # A standby answers too: it waits for the Lease, yet reads by name with its own credentials.
    standby, standby_url = operator(c, c.tmp, "operator-b")  # type: ignore[attr-defined]
    c.operators.append(standby)  # type: ignore[attr-defined]
    wait_for(lambda: "waiting for Lease" in standby.log(), 30, "B waiting", on_timeout=standby.log)
    r = wait_for(lambda: (r := get(standby_url, NS, "base", "keyed", tokens["base"])).status_code == 200 and r, 30,
                 "the standby's answer", on_timeout=standby.log)
    assert r.json()["tenants"] == [salted_key_hash("sk-raw-tenant-key", tenant_salt(NS, "base"))]
    assert code(get(standby_url, NS, "base", "keyed", tokens["other"])) == (403, "forbidden")
    assert "status of" not in standby.log(), "the standby wrote nothing"

    # Every API request of both operators, the catalog's reads included, is granted by the chart's RBAC.
    from .rbac import assert_chart_grants_operator_requests

    assert_chart_grants_operator_requests(c)


def test_lookup_refuses_deleting_and_failed_adapters():
    """The cases kmock cannot hold still long enough to ask over HTTP: an adapter being deleted
    (the finalizer handler removes it within a pass) and one Failed at its current generation."""
    from loraplex.operator import constants as C
    from loraplex.operator.catalog import ObjectCache, lookup
    from loraplex.operator.config import OperatorConfig
    from loraplex.operator.runtime import Runtime

    token = base64.b64encode(b"tok").decode()
    objects = {
        ("basemodeldeployments", "b"): {"metadata": {"name": "b"}, "spec": {}},
        ("secrets", "b-admin-token"): {"data": {"token": token}},
        ("loraadapters", "going"): {"metadata": {"generation": 1, "deletionTimestamp": "2026-11-30T00:00:00Z"},
                                    "spec": {"baseModel": "b", "source": {"type": "hub", "uri": "o/r"}}},
        ("loraadapters", "failed"): {"metadata": {"generation": 2}, "spec": {"baseModel": "b", "source": {
            "type": "hub", "uri": "o/r"}}, "status": {"phase": "Failed", "observedGeneration": 2, "conditions": [
                {"type": "Ready", "status": "False", "message": "sha256 mismatch"}]}},
        ("loraadapters", "fixed"): {"metadata": {"generation": 3}, "spec": {"baseModel": "b", "source": {
            "type": "hub", "uri": "o/r"}}, "status": {"phase": "Failed", "observedGeneration": 2}},
    }

    class Kube:
        async def get(self, ref):
            return objects.get((ref.plural, ref.name))

        async def aclose(self):
            pass

    async def run():
        rt = Runtime(OperatorConfig())
        rt._kube = Kube()
        cache = ObjectCache()
        try:
            base = objects[("basemodeldeployments", "b")]  # authenticated before (catalog_auth.TokenTable)
            going = await lookup(rt, cache, "ns", "b", "going", base)
            failed = await lookup(rt, cache, "ns", "b", "failed", base)
            fixed = await lookup(rt, cache, "ns", "b", "fixed", base)  # a new generation is tried again
            return going, failed, fixed
        finally:
            await rt.aclose()

    going, failed, fixed = asyncio.run(run())
    assert going == (409, ("adapter_deleting", "LoraAdapter 'going' is being deleted"))
    assert failed[0] == 409 and failed[1][0] == "adapter_failed" and "sha256 mismatch" in failed[1][1]
    assert fixed == (200, {"name": "fixed", "source": "hub", "uri": "o/r", "preload": False, "tenants": [],
                           "revisions": [{"number": 1, "percent": 100, "source": "hub", "uri": "o/r"}]})
    assert C.CATALOG_PREFIX == "/catalog/v1"


def test_object_cache_is_bounded_and_expires():
    """The catalog's read cache holds at most max_entries objects (oldest out) for ttl seconds:
    10,000 adapters looked up cost a bounded amount of memory."""
    from loraplex.operator.catalog import ObjectCache
    from loraplex.operator.kube import Ref

    reads = []

    class Kube:
        async def get(self, ref):
            reads.append(ref.name)
            return {"metadata": {"name": ref.name}}

    class Rt:
        kube = Kube()

    async def run():
        cache = ObjectCache(ttl=60, max_entries=100)
        for i in range(10_000):
            await cache.get(Rt, Ref("loraplex.dev/v1alpha1", "loraadapters", "ns", f"a{i}"))
        assert len(cache.items) == 100 and len(reads) == 10_000
        await cache.get(Rt, Ref("loraplex.dev/v1alpha1", "loraadapters", "ns", "a9999"))  # recent: a hit
        assert len(reads) == 10_000
        await cache.get(Rt, Ref("loraplex.dev/v1alpha1", "loraadapters", "ns", "a0"))  # pushed out: read again
        assert len(reads) == 10_001
        # Names that are no object (made-up adapter names) never push out the objects found.
        class Missing:
            async def get(self, ref):
                reads.append(ref.name)
                return None

        class Nothing:
            kube = Missing()

        for i in range(1000):
            assert await cache.get(Nothing, Ref("loraplex.dev/v1alpha1", "loraadapters", "ns", f"nobody{i}")) is None
        assert len(cache.items) == 100 and len(cache.missing) == 100
        await cache.get(Rt, Ref("loraplex.dev/v1alpha1", "loraadapters", "ns", "a9999"))  # still a hit
        assert reads[-1] == "nobody999"
        expired = ObjectCache(ttl=0, max_entries=100)
        for _ in range(2):
            await expired.get(Rt, Ref("loraplex.dev/v1alpha1", "loraadapters", "ns", "x"))
        assert reads[-2:] == ["x", "x"]

    asyncio.run(run())


def test_api_trouble_is_503_with_retry_after_and_a_forbidden_namespace_is_403():
    """Over HTTP (the aiohttp app in-process): the API server failing -> 503 + Retry-After (the
    engine asks again later), before the bases were ever read too; a namespace the operator's RBAC
    does not cover -> 403, as any base that is not the operator's."""
    from aiohttp.test_utils import TestClient, TestServer

    from loraplex.operator.catalog import make_app
    from loraplex.operator.catalog_auth import TokenTable
    from loraplex.operator.config import OperatorConfig
    from loraplex.operator.kube import ApiError
    from loraplex.operator.runtime import Runtime

    class Kube:
        up = False

        async def list(self, ref):
            if ref.namespace == "other-team":
                raise ApiError(403, "forbidden")
            if not self.up:
                raise ApiError(500, "no")
            return [{"metadata": {"name": "b", "namespace": "team"}, "spec": {}}]

        async def get(self, ref):
            if ref.plural == "secrets":
                return {"data": {"token": base64.b64encode(b"tok").decode()}}
            raise ApiError(500, "no")

        async def aclose(self):
            pass

    async def run():
        rt = Runtime(OperatorConfig(catalog_refresh_interval=0.05))
        rt._kube = Kube()
        async with TestClient(TestServer(make_app(rt, TokenTable(("team", "other-team"))))) as client:
            auth = {"Authorization": "Bearer tok"}
            unread = await client.get("/catalog/v1/team/b/adapters/a", headers=auth)
            rt._kube.up = True
            await asyncio.sleep(0.3)
            down = await client.get("/catalog/v1/team/b/adapters/a", headers=auth)
            forbidden = await client.get("/catalog/v1/other-team/b/adapters/a", headers=auth)
            out = (unread.status, (await unread.json())["error"]["code"],
                   down.status, down.headers.get("Retry-After"), (await down.json())["error"]["code"],
                   forbidden.status, (await forbidden.json())["error"]["code"])
        await rt.aclose()
        return out

    assert asyncio.run(run()) == (503, "catalog_unavailable", 503, "2", "catalog_unavailable", 403, "forbidden")


def test_strangers_cost_no_api_call_and_each_caller_has_its_own_rate(monkeypatch):
    """Issue 20, finding 7, over HTTP against the in-memory API server (fake_api.py counts every
    request). 3,000 lookups with a made-up token for made-up bases used to cost 3,000 API GETs;
    now the catalog authenticates from the table it refreshes in the background: zero API requests,
    403 until the caller's bucket is spent, then 429 with Retry-After. A base's engines forwarding
    made-up names spend that base's bucket only: another base is still answered."""
    from collections import Counter

    from aiohttp.test_utils import TestClient, TestServer

    from loraplex.operator.catalog import make_app
    from loraplex.operator.config import OperatorConfig
    from loraplex.operator.runtime import Runtime

    from .fake_api import FakeApi

    # Set through the environment (as the chart does): one refresh at start, a small bucket.
    monkeypatch.setenv("LORAPLEX_CATALOG_REFRESH_INTERVAL", "3600")
    monkeypatch.setenv("LORAPLEX_CATALOG_RATE", "5")
    monkeypatch.setenv("LORAPLEX_CATALOG_BURST", "40")
    api = FakeApi()
    root = "/apis/loraplex.dev/v1alpha1/namespaces/team"
    tokens = {"b": "token-of-b", "c": "token-of-c"}
    for base, token in tokens.items():
        api.put(f"{root}/basemodeldeployments/{base}", {"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {
            "name": base, "namespace": "team", "generation": 1}, "spec": {"model": {"id": "org/m"}}})
        api.put(f"/api/v1/namespaces/team/secrets/{base}-admin-token", {"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": f"{base}-admin-token", "namespace": "team"}, "data": {"token": base64.b64encode(token.encode()).decode()}})
        api.put(f"{root}/loraadapters/{base}-real", {"apiVersion": API, "kind": "LoraAdapter", "metadata": {
            "name": f"{base}-real", "namespace": "team", "generation": 1}, "spec": {
                "baseModel": base, "source": {"type": "hub", "uri": f"org/{base}-real"}}})

    async def run():
        rt = Runtime(OperatorConfig.from_env())
        rt._kube = await api.client()
        try:
            async with TestClient(TestServer(make_app(rt))) as client:
                async def get(base: str, name: str, token: str | None):
                    headers = {"Authorization": f"Bearer {token}"} if token else {}
                    r = await client.get(f"/catalog/v1/team/{base}/adapters/{name}", headers=headers)
                    return r.status, await r.json(), r.headers.get("Retry-After")

                for _ in range(200):  # the first refresh of the bases' tokens
                    if (await get("b", "b-real", tokens["b"]))[0] == 200:
                        break
                    await asyncio.sleep(0.05)
                before = api.received
                strangers = [await get(f"made-up-{i}", "b-real", "made-up-token") for i in range(3000)]
                stranger_calls = api.received - before
                anonymous = [await get("b", "b-real", None) for _ in range(50)]
                before = dict(api.requests)
                forwarded = [await get("b", f"nobody-{i}", tokens["b"]) for i in range(300)]
                adapter_reads = api.requests["GET loraadapters"] - before.get("GET loraadapters", 0)
                other_base = await get("c", "c-real", tokens["c"])
                return stranger_calls, strangers, anonymous, forwarded, adapter_reads, other_base
        finally:
            await rt.aclose()
            await api.aclose()

    stranger_calls, strangers, anonymous, forwarded, adapter_reads, other_base = asyncio.run(run())
    assert stranger_calls == 0, f"{stranger_calls} API requests for 3,000 lookups with a made-up token"
    codes = Counter(status for status, _, _ in strangers)
    assert set(codes) == {403, 429} and codes[429] >= 2900, codes
    status, body, retry_after = next(s for s in strangers if s[0] == 429)
    assert body["error"]["code"] == "rate_limited" and body["error"]["type"] == "rate_limit_error"
    assert set(body["error"]) == {"message", "type", "param", "code"} and int(retry_after) >= 1
    assert {s[0] for s in anonymous} <= {401, 429}
    # The base's own engines asking for 300 names nobody registered: at most its burst (+ what
    # refills while they ask) reach the API; the rest are 429 for that base alone.
    assert Counter(s for s, _, _ in forwarded)[429] >= 200 and adapter_reads <= 60, adapter_reads
    assert {s for s, _, _ in forwarded} == {404, 429}
    assert other_base[0] == 200 and other_base[1]["name"] == "c-real"
