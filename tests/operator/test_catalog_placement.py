"""The catalog's placement endpoint (operator/loraplex/operator/catalog.py) through its real aiohttp
app, against the in-memory API server (fake_api.py):

    GET /catalog/v1/{ns}/{base}/placement/{pod}?limit=N  ->  {"adapters": [manifest, ...], "placed": n}

The Runtime holds what a pass over the base left (sync.accept_adapters and placement.place_adapters
run for real; the pass's pods are set as sync_pods sets them). Checked: the answer is placement.py's
own plan for the pods plus the asking pod, hottest first (then by name), preload adapters and other
bases' adapters left out, the manifests as the adapter lookup answers them; at most `limit`, and
at most PLACEMENT_MAX; the lookup's authentication and per-base rate; a replica without a pass
(a standby) 503 with Retry-After on a closed connection; and the engine's client
(catalog_source.CatalogSource.placement) reading the answer.
"""
from __future__ import annotations

import asyncio
import base64

from aiohttp.test_utils import TestClient, TestServer

from loraplex.operator import placement as P
from loraplex.operator import sync
from loraplex.operator import revision_pass
from loraplex.operator.catalog import PLACEMENT_MAX, make_app
from loraplex.operator.config import OperatorConfig
from loraplex.operator.constants import Key
from loraplex.operator.fleet import PodMemory
from loraplex.operator.runtime import Runtime

from .fake_api import FakeApi

NS = "team"
API = "loraplex.dev/v1alpha1"
ROOT = f"/apis/{API}/namespaces/{NS}"
TOKENS = {"b": "token-of-b", "c": "token-of-c", "big": "token-of-big"}
PODS = ["b-0", "b-1", "b-2"]
RATES = {"charlie": 5.0, "keyed": 2.0}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _cluster() -> tuple[FakeApi, dict[str, dict], dict[str, list[dict]]]:
    """Bases b (every adapter on every pod unless it says otherwise), c and big; their adapters."""
    api = FakeApi()
    bases = {"b": {"placement": {"replicas": "all"}}, "c": {}, "big": {"placement": {"replicas": "all"}}}
    bodies = {}
    for name, extra in bases.items():
        bodies[name] = {"apiVersion": API, "kind": "BaseModelDeployment", "metadata": {
            "name": name, "namespace": NS, "generation": 1}, "spec": {"model": {"id": "org/m"}, **extra}}
        api.put(f"{ROOT}/basemodeldeployments/{name}", bodies[name])
        api.put(f"/api/v1/namespaces/{NS}/secrets/{name}-admin-token", {"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": f"{name}-admin-token", "namespace": NS}, "data": {"token": _b64(TOKENS[name])}})
    api.put(f"/api/v1/namespaces/{NS}/secrets/keys", {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "keys", "namespace": NS}, "data": {"k": _b64("sk-raw-tenant-key")}})

    def lora(name: str, base: str, **spec) -> dict:
        body = {"apiVersion": API, "kind": "LoraAdapter", "metadata": {"name": name, "namespace": NS, "generation": 1,
                "uid": f"uid-{name}"}, "spec": {"baseModel": base, "source": {"type": "hub", "uri": f"org/{name}"}, **spec}}
        api.put(f"{ROOT}/loraadapters/{name}", body)
        return {"name": name, "uid": f"uid-{name}", "spec": body["spec"], "deleting": False, "generation": 1,
                "status": {}}

    adapters = {
        "b": [lora("alpha", "b"), lora("bravo", "b"), lora("charlie", "b"), lora("delta", "b"),
              lora("keyed", "b", access={"apiKeySecretRefs": [{"name": "keys", "key": "k"}]}),
              lora("pre", "b", preload=True), lora("solo", "b", placement={"replicas": 1})],
        "c": [lora("elsewhere", "c")],
        "big": [lora(f"many-{i:03d}", "big") for i in range(PLACEMENT_MAX + 44)],
    }
    return api, bodies, adapters


async def _after_a_pass(rt: Runtime, bodies: dict, adapters: dict) -> None:
    """What a pass over each base leaves in the Runtime (reconcile.reconcile_base's first steps)."""
    for name, body in bodies.items():
        pods = [f"{name}-{i}" for i in range(3)]
        accepted = await sync.accept_adapters(rt, body, adapters[name])
        assert not accepted.problems, accepted.problems
        by_name = {a["name"]: a for a in adapters[name]}
        wants, _ = P.wants_of(accepted.placements, by_name, {}, len(pods))
        placed = P.place_adapters(rt.placements, NS, name, wants, by_name, pods)
        revision_pass.plan_revisions(rt, body, adapters[name], accepted, placed, set(pods))  # served manifests
        rt.sync.pods[Key(NS, name)] = {p: PodMemory() for p in pods}


def test_placement_answers_the_plan_hottest_first_bounded_and_authenticated(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_CATALOG_REFRESH_INTERVAL", "3600")
    monkeypatch.setenv("LORAPLEX_CATALOG_RATE", "1")
    monkeypatch.setenv("LORAPLEX_CATALOG_BURST", "30")
    api, bodies, adapters = _cluster()

    async def run():
        rt = Runtime(OperatorConfig.from_env())
        rt._kube = await api.client()
        standby = Runtime(OperatorConfig.from_env())
        standby._kube = await api.client()
        try:
            await _after_a_pass(rt, bodies, adapters)
            out = {}
            async with TestClient(TestServer(make_app(rt, rates=lambda ns, base: RATES if base == "b" else {}))) as client:
                async def get(base: str, pod: str, token: str | None = None, query: str = ""):
                    headers = {"Authorization": f"Bearer {token}"} if token else {}
                    r = await client.get(f"/catalog/v1/{NS}/{base}/placement/{pod}{query}", headers=headers)
                    return r.status, await r.json(), r.headers

                for _ in range(200):  # the first refresh of the bases' admin tokens
                    if (await get("b", "b-0", TOKENS["b"]))[0] == 200:
                        break
                    await asyncio.sleep(0.05)
                out["new"] = await get("b", "b-3", TOKENS["b"])
                out["old"] = await get("b", "b-0", TOKENS["b"])
                out["two"] = await get("b", "b-3", TOKENS["b"], "?limit=2")
                out["big"] = await get("big", "big-9", TOKENS["big"])
                r = await client.get(f"/catalog/v1/{NS}/b/adapters/keyed", headers={"Authorization": f"Bearer {TOKENS['b']}"})
                out["keyed"] = await r.json()
                out["bad_limits"] = [await get("b", "b-3", TOKENS["b"], q) for q in ("?limit=0", "?limit=257", "?limit=x")]
                out["bad_pod"] = await get("b", "B_3", TOKENS["b"])
                out["no_token"] = await get("b", "b-3")
                out["wrong"] = await get("b", "b-3", "nope")
                out["other_base"] = await get("b", "b-3", TOKENS["c"])
                out["c"] = await get("c", "c-5", TOKENS["c"])
                # The engine's client, on the same app (a real TCP port): blocking, so off the loop.
                from loraplex.engine.core.adapters.catalog_source import CatalogSource

                token_file = tmp_path / "token"
                token_file.write_text(TOKENS["b"] + "\n")
                src = CatalogSource(str(client.make_url(f"/catalog/v1/{NS}/b")), str(token_file))
                try:
                    out["engine_client"] = await asyncio.to_thread(src.placement, "b-3", 10, 5.0)
                finally:
                    src.close()
                # The base's bucket (30, 1 a second) is shared with its lookups: a burst runs it dry.
                out["burst"] = [(await get("b", "b-3", TOKENS["b"]))[0] for _ in range(40)]
            async with TestClient(TestServer(make_app(standby))) as client:
                for _ in range(200):
                    r = await client.get(f"/catalog/v1/{NS}/b/placement/b-3", headers={"Authorization": f"Bearer {TOKENS['b']}"})
                    if (await r.json())["error"]["code"] != "catalog_unavailable":  # its first token refresh
                        break
                    await asyncio.sleep(0.05)
                out["standby"] = (r.status, await r.json(), r.headers)
            return out
        finally:
            await rt.aclose()
            await standby.aclose()
            await api.aclose()

    out = asyncio.run(run())

    # A new pod gets what placement.place gives it over the pass's pods plus itself.
    status, body, _ = out["new"]
    assert status == 200, body
    names = [m["name"] for m in body["adapters"]]
    solo_here = P.ranked("solo", PODS + ["b-3"])[0] == "b-3"
    expected = ["charlie", "keyed", "alpha", "bravo", "delta"] + (["solo"] if solo_here else [])
    expected = expected[:2] + sorted(expected[2:])  # hottest first, then by name
    assert names == expected and body["placed"] == len(expected)
    assert "pre" not in names and "elsewhere" not in names  # preloads come with the ConfigMap; other bases'
    # A pod of the pass gets exactly what the pass placed on it.
    status, body, _ = out["old"]
    assert status == 200
    placed_b0 = sorted(n for n in ("alpha", "bravo", "charlie", "delta", "keyed", "solo")
                       if "b-0" in P.place([P.Want(n, 1 if n == "solo" else "all")], PODS)[n])
    assert sorted(m["name"] for m in body["adapters"]) == placed_b0
    # The manifests are the lookup's (tenant key hashes, never the keys).
    keyed = next(m for m in out["new"][1]["adapters"] if m["name"] == "keyed")
    assert keyed == out["keyed"] and keyed["tenants"] and "sk-raw-tenant-key" not in str(out["new"][1])
    # Bounds: ?limit, and PLACEMENT_MAX without one.
    status, body, _ = out["two"]
    assert [m["name"] for m in body["adapters"]] == ["charlie", "keyed"] and body["placed"] == len(expected)
    status, body, _ = out["big"]
    assert status == 200 and len(body["adapters"]) == PLACEMENT_MAX and body["placed"] == PLACEMENT_MAX + 44
    assert [m["name"] for m in body["adapters"]] == [f"many-{i:03d}" for i in range(PLACEMENT_MAX)]  # equal rates: by name
    for status, body, _ in out["bad_limits"]:
        assert (status, body["error"]["code"]) == (400, "invalid_limit")
    assert (out["bad_pod"][0], out["bad_pod"][1]["error"]["code"]) == (400, "invalid_pod")
    # Authentication as the lookup's: the base's own admin token only.
    assert (out["no_token"][0], out["no_token"][1]["error"]["code"]) == (401, "missing_token")
    assert (out["wrong"][0], out["other_base"][0]) == (403, 403)
    c_here = "c-5" in P.ranked("elsewhere", ["c-0", "c-1", "c-2", "c-5"])[:P.DEFAULT_REPLICAS]
    assert out["c"][0] == 200 and [m["name"] for m in out["c"][1]["adapters"]] == (["elsewhere"] if c_here else [])
    assert 429 in out["burst"] and set(out["burst"]) == {200, 429}
    # The engine's client reads the same answer.
    assert [m.name for m in out["engine_client"]] == names
    assert [m.model_dump(exclude_none=True) for m in out["engine_client"]] == out["new"][1]["adapters"]
    # A replica that made no pass over the base: 503, ask again (on another connection).
    status, body, headers = out["standby"]
    assert (status, body["error"]["code"]) == (503, "placement_unknown")
    assert headers["Retry-After"] == "1" and headers.get("Connection", "").lower() == "close"



def test_placed_on_pod_is_what_place_plans_for_the_pods_plus_the_asking_one():
    """`placed_on_pod` decides spread adapters from their last placement (two hashes each, not
    one per pod); over random fleets (spread and least-loaded, 1 to 3 or all replicas, preloads)
    its answer for every pod of the pass and for a new one is what placement.place plans."""
    import random

    from loraplex.operator.catalog import base_view, placed_on_pod

    async def run(seed: int) -> list[tuple[str, list[str], list[str]]]:
        rng = random.Random(seed)
        rt = Runtime(OperatorConfig())  # no Secret is referenced: no API call
        pods = [f"p-{seed}-{i}" for i in range(rng.randint(1, 6))]
        base = {"metadata": {"name": "b", "namespace": NS}, "spec": {"placement": {"replicas": rng.choice([1, 2])}}}
        adapters = []
        for i in range(rng.randint(1, 40)):
            spec = {"baseModel": "b", "source": {"type": "hub", "uri": f"org/a{i}"}, "preload": rng.random() < 0.1}
            if rng.random() < 0.7:
                spec["placement"] = {"replicas": rng.choice([1, 2, 3, "all"]),
                                     "policy": "least-loaded" if seed % 3 == 0 and rng.random() < 0.5 else "spread"}
            adapters.append({"name": f"a{i}", "uid": f"u{i}", "spec": spec, "deleting": False, "status": {}})
        accepted = await sync.accept_adapters(rt, base, adapters)
        by_name = {a["name"]: a for a in adapters}
        P.place_adapters(rt.placements, NS, "b", P.wants_of(accepted.placements, by_name, {}, len(pods))[0],
                         by_name, pods)
        rt.sync.pods[Key(NS, "b")] = {p: PodMemory() for p in pods}
        resolved = {a["name"]: P.resolve(a["spec"].get("placement"), base["spec"]["placement"], a["spec"]["preload"])
                    for a in adapters}
        wants = [P.Want(name, r.replicas, r.policy) for name, r in resolved.items()]
        previous = {name: rt.placements.where[Key(NS, name)] for name in accepted.manifests}
        out = []
        for pod in [*pods, f"p-{seed}-new"]:
            got, placed = placed_on_pod(pod, base_view(rt, NS, "b", base), limit=PLACEMENT_MAX)
            plan = P.place(wants, {*pods, pod}, previous)
            want = sorted(n for n, on in plan.items() if pod in on and not accepted.manifests[n].preload)
            out.append((pod, sorted(m.name for m in got), want))
            assert placed == len(want)
        await rt.aclose()
        return out

    for seed in range(40):
        for pod, got, want in asyncio.run(run(seed)):
            assert got == want, (seed, pod)


def test_auto_adapters_are_planned_at_their_count_and_bad_placements_left_out():
    """Issue 24, the operator's side: an auto adapter is planned at the count the last pass placed
    it at (demand.py's decision), hottest first by the runtime's rates (the catalog's `rates` is
    `rt.adapter_rates.of_base` in `serve`); an adapter whose placement cannot be used is not
    planned (it used to make the answer fail)."""
    from loraplex.operator import demand as D
    from loraplex.operator.catalog import base_view, placed_on_pod

    async def run() -> None:
        rt = Runtime(OperatorConfig())
        pods = ["p0", "p1", "p2", "p3"]
        base = {"metadata": {"name": "b", "namespace": NS}, "spec": {"placement": {"replicas": 1}}}
        adapters = [{"name": n, "uid": n, "deleting": False, "status": {},
                     "spec": {"baseModel": "b", "source": {"type": "hub", "uri": f"org/{n}"}, **extra}}
                    for n, extra in (("hot", {"placement": {"replicas": "auto", "max": 4}}),
                                     ("cold", {}), ("bad", {"placement": {"replicas": "most"}}))]
        accepted = await sync.accept_adapters(rt, base, adapters)
        assert set(accepted.problems) == {"bad"}
        rt.adapter_rates.base(NS, "b").warm["hot"] = D.Warmth(3, "3 pods: ...")
        by_name = {a["name"]: a for a in adapters}
        wants, _ = P.wants_of(accepted.placements, by_name, rt.adapter_rates.base(NS, "b").warm, len(pods))
        placed = P.place_adapters(rt.placements, NS, "b", wants, by_name, pods)
        assert len(placed["hot"]) == 3
        rt.sync.pods[Key(NS, "b")] = {p: PodMemory() for p in pods}
        view = base_view(rt, NS, "b", base)
        for pod in pods:
            got, _ = placed_on_pod(pod, view, {"hot": 9.0})
            assert [m.name for m in got] == [n for n in ("hot", "cold") if pod in placed[n]], pod
        new_plan = P.place([P.Want("hot", 3), P.Want("cold", 1)], [*pods, "p-new"],
                           {n: placed[n] for n in ("hot", "cold")})
        got, _ = placed_on_pod("p-new", view, {"hot": 9.0})
        assert [m.name for m in got] == [n for n in ("hot", "cold") if "p-new" in new_plan[n]]
        await rt.aclose()

    asyncio.run(run())
