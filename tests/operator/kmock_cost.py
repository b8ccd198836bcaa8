"""What a request to kmock (the test suite's Kubernetes emulator) costs, and what it grows with.

    .venv/bin/python -m tests.operator.kmock_cost [--rounds 4] [--per-round 200]

Rounds of sequential requests against harness.FakeCluster (this folder), with kmock's
KubernetesEmulator as shipped (`kmock`) and with the harness's emulator that drops answered
requests from kmock's request log (`harness`, the default in the tests), in one run:
- `gets`: GET one ConfigMap again and again (1 object held; the requests served grow);
- `creates`: POST a new ConfigMap each (the objects held and the requests served grow).

With kmock as shipped the cost per request grows with the requests served (kmock matches each
request against its reactions by scanning its whole request log; see harness._emulator_class),
not with the objects held. Results: docs/operator.md, "Scale". Compare only within one run.
"""
from __future__ import annotations

import argparse
import json
import time

from tests.operator.harness import FakeCluster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for emulator, keep_log in (("kmock", True), ("harness", False)):
        with FakeCluster(keep_log=keep_log) as cluster:
            made = 0

            def create() -> None:
                nonlocal made
                cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{made}"},
                                "data": {"k": "v"}})
                made += 1

            create()
            for series, call in (("gets", lambda: cluster.get("v1", "configmaps", "default", "cm-0")),
                                 ("creates", create)):
                for r in range(args.rounds):
                    served, held = len(cluster.requests()), made
                    t = time.perf_counter()
                    for _ in range(args.per_round):
                        call()
                    ms = (time.perf_counter() - t) / args.per_round * 1000
                    rows.append({"emulator": emulator, "series": series, "round": r, "requests_served": served,
                                 "objects_held": held, "ms_per_request": round(ms, 2)})
                    print(f"{emulator:8s} {series:8s} round {r}: {served:5d} requests served, {held:5d} objects "
                          f"held: {ms:7.2f} ms per request", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
