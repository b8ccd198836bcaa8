"""The operator's Kubernetes client (operator/loraplex/operator/kube.py, over kubernetes_asyncio) against baselines,
in one run on one machine:
- per-call latency of a GET, a merge PATCH and a status PATCH, for the client and for a bare
  aiohttp session sending the same requests (the floor), against kmock and against a loopback
  server answering a fixed body (there the difference is the client's own overhead);
- listing 10,000 LoraAdapters (about 7.5 MB of JSON) from a loopback aiohttp server: the client
  (raw JSON), the bare session + json.loads (the floor), and kubernetes_asyncio's
  CustomObjectsApi (its own preloaded path);
- listing 10,000 Events the same way: the client (raw JSON) against CoreV1Api's typed models,
  the cost `_preload_content=False` avoids;
- the process's RSS.

    .venv/bin/python -m bench.kubeclient [--calls 200] [--lists 5] [--out FILE.json]
    # another revision's client, for a before/after: git show REV:operator/loraplex/operator/kube.py > /tmp/kube_rev.py
    .venv/bin/python -m bench.kubeclient --kube-module /tmp/kube_rev.py

Compare runs on the same machine only (the numbers move with the CPU and its load).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import aiohttp.web

N_LIST = 10_000
NS = "fleet"
TOKEN = "bench-token"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_kube(path: str | None) -> Any:
    if not path:
        from loraplex.operator import kube
        return kube
    spec = importlib.util.spec_from_file_location("kube_under_test", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def client_for(kube: Any, url: str) -> Any:
    if hasattr(kube.KubeClient, "for_server"):
        return kube.KubeClient.for_server(url, token=TOKEN)
    return kube.KubeClient(url, token=TOKEN)  # the hand-rolled httpx client before kubernetes_asyncio


def adapter(i: int) -> dict:
    """A LoraAdapter as the operator leaves it: spec with a tenant key, Ready status."""
    return {"apiVersion": "loraplex.dev/v1alpha1", "kind": "LoraAdapter",
            "metadata": {"name": f"tenant-{i:05d}-support", "namespace": NS, "uid": f"{i:08d}-0000-4000-8000-000000000000",
                         "generation": 1, "resourceVersion": str(1000 + i), "creationTimestamp": "2026-11-30T20:00:00Z",
                         "finalizers": ["loraplex.dev/adapter-unload"]},
            "spec": {"baseModel": "cat", "source": {"type": "hf", "uri": f"acme/tenant-{i}-lora", "revision": "main"},
                     "access": {"apiKeySecretRefs": [{"name": f"keys-{i // 100}", "key": f"k{i}"}]}},
            "status": {"phase": "Ready", "readyReplicas": 2, "placement": ["cat-0", "cat-1"], "observedGeneration": 1,
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Loaded", "message": "2/2 pods",
                                       "lastTransitionTime": "2026-11-30T20:01:00Z"}]}}


def event(i: int) -> dict:
    return {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"cat.{i:016x}", "namespace": NS, "resourceVersion": str(i),
                         "creationTimestamp": "2026-11-30T20:00:00Z"},
            "involvedObject": {"apiVersion": "loraplex.dev/v1alpha1", "kind": "BaseModelDeployment", "name": "cat",
                               "namespace": NS, "uid": "base-uid"},
            "type": "Normal", "reason": "AdaptersPushed", "message": f"pushed {i} adapters to 2 pods",
            "source": {"component": "loraplex-operator"}, "reportingComponent": "loraplex-operator",
            "reportingInstance": "loraplex-operator-0", "action": "AdaptersPushed",
            "firstTimestamp": "2026-11-30T20:00:00Z", "lastTimestamp": "2026-11-30T20:00:00Z",
            "eventTime": "2026-11-30T20:00:00.000000Z", "count": 1}


async def timed(fn: Callable[[], Awaitable[Any]], n: int) -> dict:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    out.sort()
    return {"median_ms": statistics.median(out) * 1e3, "p95_ms": out[min(n - 1, int(n * 0.95))] * 1e3}


async def paired(mine: Callable[[], Awaitable[Any]], floor: Callable[[], Awaitable[Any]], n: int) -> dict:
    """Median latency of the client and of the floor, their calls alternating one by one (kmock
    slows down with every request it keeps: alternating weighs that on both alike)."""
    a, b = [], []
    for _ in range(n):
        for fn, out in ((mine, a), (floor, b)):
            t = time.perf_counter()
            await fn()
            out.append(time.perf_counter() - t)
    row = {"client_ms": statistics.median(a) * 1e3, "bare_aiohttp_ms": statistics.median(b) * 1e3}
    row["ratio"] = row["client_ms"] / row["bare_aiohttp_ms"]
    return row


async def serve_static(routes: dict[tuple[str, str], bytes]) -> tuple[aiohttp.web.AppRunner, str]:
    """A loopback HTTP server answering each (method, path) with a fixed JSON body."""
    app = aiohttp.web.Application()
    for (method, path), body in routes.items():
        async def handler(request: aiohttp.web.Request, body: bytes = body) -> aiohttp.web.Response:
            await request.read()
            return aiohttp.web.Response(body=body, content_type="application/json")
        app.router.add_route(method, path, handler)
    runner = aiohttp.web.AppRunner(app, access_log=None)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def per_call_rows(kube: Any, url: str, calls: int) -> dict:
    """GET, merge PATCH and status PATCH of one LoraAdapter: the client against a bare session."""
    c = client_for(kube, url)
    ref = kube.Ref("loraplex.dev/v1alpha1", "loraadapters", NS, "tenant-00001-support")
    counter = iter(range(10**9))
    path = url + ref.path()
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
    patch_headers = {**headers, "Content-Type": "application/merge-patch+json"}
    res: dict[str, dict] = {}
    async with aiohttp.ClientSession() as s:
        async def bare(method: str, p: str, body: Any = None) -> Any:
            data = json.dumps(body).encode() if body is not None else None
            async with s.request(method, p, data=data, headers=patch_headers if data else headers,
                                 params={"fieldManager": "bench"} if data else None) as r:
                return json.loads(await r.read())

        await c.get(ref)
        await bare("GET", path)
        res["get"] = await paired(lambda: c.get(ref), lambda: bare("GET", path), calls)
        res["merge_patch"] = await paired(
            lambda: c.patch(ref, {"metadata": {"labels": {"n": str(next(counter))}}}),
            lambda: bare("PATCH", path, {"metadata": {"labels": {"n": str(next(counter))}}}), calls)
        res["status_patch"] = await paired(
            lambda: c.patch_status(ref, {"readyReplicas": next(counter)}),
            lambda: bare("PATCH", path + "/status", {"status": {"readyReplicas": next(counter)}}), calls)
    await c.aclose()
    return res


async def per_call(kube: Any, calls: int) -> dict:
    import kmock

    async with kmock.KubernetesEmulator() as k, kmock.Server(k) as srv:
        k.resources["loraplex.dev/v1alpha1/loraadapters"] = kmock.ResourceInfo(
            namespaced=True, kind="LoraAdapter", verbs={"get", "list", "watch", "create", "patch", "delete"},
            subresources={"status"})
        url = str(srv.url).rstrip("/")
        c = client_for(kube, url)
        await c.create(kube.Ref("loraplex.dev/v1alpha1", "loraadapters", NS, "tenant-00001-support"), adapter(1))
        await c.aclose()
        on_kmock = await per_call_rows(kube, url, calls)
    # The same against a server that costs nothing: what is left is the clients' own overhead.
    path = f"/apis/loraplex.dev/v1alpha1/namespaces/{NS}/loraadapters/tenant-00001-support"
    body = json.dumps(adapter(1)).encode()
    runner, url = await serve_static({("GET", path): body, ("PATCH", path): body, ("PATCH", path + "/status"): body})
    try:
        on_loopback = await per_call_rows(kube, url, calls)
    finally:
        await runner.cleanup()
    return {"kmock": on_kmock, "static_loopback": on_loopback}


async def listing(kube: Any, lists: int) -> dict:
    from kubernetes_asyncio import client as k8s

    adapters = json.dumps({"apiVersion": "loraplex.dev/v1alpha1", "kind": "LoraAdapterList",
                           "metadata": {"resourceVersion": "1"}, "items": [adapter(i) for i in range(N_LIST)]}).encode()
    events = json.dumps({"apiVersion": "v1", "kind": "EventList", "metadata": {"resourceVersion": "1"},
                         "items": [event(i) for i in range(N_LIST)]}).encode()
    runner, url = await serve_static({("GET", f"/apis/loraplex.dev/v1alpha1/namespaces/{NS}/loraadapters"): adapters,
                                      ("GET", f"/api/v1/namespaces/{NS}/events"): events})
    c = client_for(kube, url)
    cfg = k8s.Configuration(host=url)
    cfg.api_key["BearerToken"] = f"Bearer {TOKEN}"
    lib = k8s.ApiClient(cfg)
    custom, core = k8s.CustomObjectsApi(lib), k8s.CoreV1Api(lib)
    adapters_ref = kube.Ref("loraplex.dev/v1alpha1", "loraadapters", NS)
    events_ref = kube.Ref("v1", "events", NS)
    res: dict[str, Any] = {"adapters_mb": len(adapters) / 1e6, "events_mb": len(events) / 1e6}
    async with aiohttp.ClientSession() as s:
        async def bare() -> list:
            async with s.get(url + adapters_ref.path(), headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                return json.loads(await r.read())["items"]

        async def custom_list() -> list:
            return (await custom.list_namespaced_custom_object("loraplex.dev", "v1alpha1", NS, "loraadapters"))["items"]

        async def typed_events() -> list:
            return (await core.list_namespaced_event(NS)).items

        assert len(await c.list(adapters_ref)) == len(await bare()) == len(await custom_list()) == N_LIST
        assert len(await c.list(events_ref)) == len(await typed_events()) == N_LIST
        rows = {"adapters_client": lambda: c.list(adapters_ref), "adapters_bare_aiohttp": bare,
                "adapters_custom_objects_api": custom_list,
                "events_client_raw": lambda: c.list(events_ref), "events_core_v1_typed": typed_events}
        for name, fn in rows.items():
            res[name + "_ms"] = (await timed(fn, lists))["median_ms"]
    res["adapters_client_vs_bare"] = res["adapters_client_ms"] / res["adapters_bare_aiohttp_ms"]
    res["events_typed_vs_raw"] = res["events_core_v1_typed_ms"] / res["events_client_raw_ms"]
    await c.aclose()
    await lib.close()
    await runner.cleanup()
    return res


async def main_async(args: argparse.Namespace) -> dict:
    rss_start = rss_mib()
    kube = load_kube(args.kube_module)
    rss_imported = rss_mib()
    out = {"client": args.kube_module or "loraplex.operator.kube",
           "per_call": await per_call(kube, args.calls), "list_10k": await listing(kube, args.lists)}
    out["rss_mib"] = {"start": rss_start, "after_import": rss_imported, "end": rss_mib()}
    return out


def rounded(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return round(x, 3) if isinstance(x, float) else x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200, help="requests per per-call row")
    ap.add_argument("--lists", type=int, default=5, help="listings of 10,000 objects per row")
    ap.add_argument("--kube-module", help="path of another revision's operator/loraplex/operator/kube.py")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    out = asyncio.run(main_async(args))
    text = json.dumps(rounded(out), indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
