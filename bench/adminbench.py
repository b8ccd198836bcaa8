"""The engine's adapter admin API at catalog scale: registering and listing 10,000 adapters.

    .venv/bin/python -m bench.adminbench [--adapters 10000] [--single 2000] [--batch 200]

One `loraplex-engine` (a random tiny Llama, --num-threads 1) on loopback, then, in one run:
- `PUT /v1/adapters/{name}`, one request per manifest, sequential (the first `--single` manifests);
- `POST /v1/adapters:batch`, `--batch` manifests per request (the rest, up to `--adapters`);
- `GET /v1/adapters` and `GET /v1/adapters?view=compact` over all of them (median of 3).
Each manifest carries one tenant key hash, as the operator's do. Reported: wall time, and the
engine process's own CPU time (from /proc), per registration and per listing; the ratios are what
to compare across machines. Compare only within one run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TOKEN = "bench-admin-token"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def manifest(i: int) -> dict:
    return {"name": f"tenant-{i:05d}-support", "source": "local", "uri": "shared",
            "tenants": [hashlib.sha256(f"sk-tenant-{i}".encode()).hexdigest()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--single", type=int, default=2_000, help="of them registered with one PUT each")
    ap.add_argument("--batch", type=int, default=200, help="manifests per POST /v1/adapters:batch")
    args = ap.parse_args()
    from bench.tiny import make_tiny_adapter, make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_tiny_checkpoint(root / "base", family="llama")
        make_tiny_adapter(base, root / "adapters" / "shared", rank=4, target_modules=["q_proj", "v_proj"])
        (root / "token").write_text(TOKEN + "\n")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("loraplex-engine")), "--model-id", str(base), "--dtype", "float32",
             "--host", "127.0.0.1", "--port", str(port), "--adapter-dir", str(root / "adapters"),
             "--admin-token-file", str(root / "token"), "--num-kv-blocks", "32", "--log-level", "warning",
             "--num-threads", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        url = f"http://127.0.0.1:{port}"
        results = {}
        try:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120,
                              trust_env=False) as http:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if http.get("/ready").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("the engine did not come up")
                    time.sleep(0.2)

                def measure(label: str, count: int, work) -> None:
                    cpu, t = cpu_seconds(proc.pid), time.perf_counter()
                    work()
                    wall, cpu = time.perf_counter() - t, cpu_seconds(proc.pid) - cpu
                    results[label] = {"count": count, "wall_ms_each": round(wall / count * 1000, 3),
                                      "engine_cpu_ms_each": round(cpu / count * 1000, 3)}
                    print(f"{label:28s} {count:6d}: {wall / count * 1000:8.3f} ms wall, "
                          f"{cpu / count * 1000:8.3f} ms engine CPU each", flush=True)

                def single() -> None:
                    for i in range(args.single):
                        m = manifest(i)
                        http.put(f"/v1/adapters/{m['name']}", json=m).raise_for_status()

                def batched() -> None:
                    for lo in range(args.single, args.adapters, args.batch):
                        body = {"adapters": [manifest(i) for i in range(lo, min(args.adapters, lo + args.batch))]}
                        http.post("/v1/adapters:batch", json=body).raise_for_status()

                measure("PUT, one per manifest", args.single, single)
                measure(f"POST :batch of {args.batch}", args.adapters - args.single, batched)
                for view in ("full", "compact"):
                    runs = []
                    for _ in range(3):
                        cpu, t = cpu_seconds(proc.pid), time.perf_counter()
                        r = http.get("/v1/adapters", params={"view": view})
                        r.raise_for_status()
                        runs.append((time.perf_counter() - t, cpu_seconds(proc.pid) - cpu, len(r.content)))
                    assert len(r.json()["data"]) == args.adapters
                    wall, cpu, size = (statistics.median(x[k] for x in runs) for k in range(3))
                    results[f"list {view}"] = {"count": args.adapters, "wall_ms": round(wall * 1000, 1),
                                               "engine_cpu_ms": round(cpu * 1000, 1), "bytes": int(size)}
                    print(f"GET /v1/adapters?view={view:8s} {args.adapters:6d}: {wall * 1000:8.1f} ms wall, "
                          f"{cpu * 1000:8.1f} ms engine CPU, {int(size)} bytes", flush=True)
        finally:
            proc.terminate()
            proc.wait(20)
    one, many = results["PUT, one per manifest"], results[f"POST :batch of {args.batch}"]
    results["ratio single/batch engine CPU per manifest"] = round(one["engine_cpu_ms_each"]
                                                                   / max(many["engine_cpu_ms_each"], 1e-6), 1)
    results["ratio full/compact listing bytes"] = round(results["list full"]["bytes"]
                                                        / results["list compact"]["bytes"], 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
