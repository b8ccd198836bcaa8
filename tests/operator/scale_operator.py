"""The operator's side of test_fleet_scale.py, in a process of its own so that its memory is the
operator's alone (no torch, no in-memory API, no test data):

    python -m tests.operator.scale_operator API_URL TOKEN NAMESPACE BASE PORT IP[,IP...] LIMIT_S

Reconcile passes over one base (the operator's real reconcile.reconcile_base, its real client)
until every LoraAdapter of the base is Ready, then one settled pass. Between passes the adapters
are listed from the API, as kopf's index would hold them; those lists are not counted as the
pass's requests (kopf gets them from its watch). Prints one JSON line: seconds to Ready, per pass
the engine calls, API requests (by method) and seconds, and the process's RSS (before the first
pass, after the last, and its peak). The base is read again between passes too (kopf's daemon
body follows the object).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

from loraplex.operator import constants as C
from loraplex.operator import reconcile as R
from loraplex.operator.config import OperatorConfig
from loraplex.operator.constants import Key
from loraplex.operator.kube import KubeClient, Ref
from loraplex.operator.runtime import Runtime
from loraplex.operator.status import PodView


def memory(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class CountingKube(KubeClient):
    """The operator's client, counting its requests by method."""

    counts: Counter = Counter()

    async def _request(self, method: str, path: str, **kwargs):  # type: ignore[override]
        self.counts[method] += 1
        return await super()._request(method, path, **kwargs)


async def main(url: str, token: str, ns: str, base_name: str, port: int, ips: list[str], limit_s: float) -> dict:
    # Secrets are read again once per resync interval (runtime.secret_ttl): longer than the run here,
    # so that the settled pass shows what a pass itself costs, however long the first one took.
    rt = Runtime(OperatorConfig(resync_interval=max(30.0, 2 * limit_s), poll_interval=0.5))
    kube = rt._kube = CountingKube.for_server(url, token=token)
    try:
        base = await kube.get(Ref(C.API_VERSION, C.BMD_PLURAL, ns, base_name))
        pods = [PodView(name=f"{base_name}-{i}", uid=f"pod-{i}", ip=ip, port=port, ready=True)
                for i, ip in enumerate(ips)]

        async def index() -> list[dict]:
            items = await kube.list(Ref(C.API_VERSION, C.LORA_PLURAL, ns))
            kube.counts["GET"] -= 1
            return [{"name": o["metadata"]["name"], "uid": o["metadata"].get("uid"), "spec": o.get("spec") or {},
                     "deleting": False, "generation": o["metadata"].get("generation"), "status": o.get("status") or {}}
                    for o in items]

        adapters = await index()
        rss_start = memory("VmRSS")
        passes = []
        t0 = time.monotonic()

        async def one_pass() -> None:
            before, t = Counter(kube.counts), time.monotonic()
            await R.reconcile_base(rt, base, pods, adapters)
            passes.append({"engine_calls": rt.sync.last_pass[Key(ns, base_name)].engine_calls,
                           "api_requests": dict(kube.counts - before), "seconds": round(time.monotonic() - t, 2)})

        async def refresh_base() -> dict:
            # kopf hands the daemon a live body: the base's own status writes are in it.
            body = await kube.get(Ref(C.API_VERSION, C.BMD_PLURAL, ns, base_name))
            kube.counts["GET"] -= 1
            return body

        while True:
            await one_pass()
            adapters = await index()
            base = await refresh_base()
            if all(a["status"].get("phase") == "Ready" for a in adapters):
                break
            if time.monotonic() - t0 > limit_s:
                return {"error": f"not all Ready after {limit_s:.0f}s", "passes": passes}
        ready_s = time.monotonic() - t0
        await one_pass()  # a settled pass: it reads back the statuses the last one wrote
        await one_pass()  # and one more: a fleet at rest (what every later pass costs)
        return {"adapters": len(adapters), "ready_s": round(ready_s, 1), "passes": passes,
                "settled": dataclasses.asdict(rt.sync.last_pass[Key(ns, base_name)]), "rss_start": rss_start, "rss": memory("VmRSS"),
                "rss_peak": memory("VmHWM")}
    finally:
        await rt.aclose()


if __name__ == "__main__":
    url, token, ns, base_name, port, ips, limit_s = sys.argv[1:8]
    print(json.dumps(asyncio.run(main(url, token, ns, base_name, int(port), ips.split(","), float(limit_s)))))
