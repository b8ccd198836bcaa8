"""What OpenTelemetry tracing costs the engine: the same HTTP workload with tracing off and on.

Each run is a fresh process (the OpenTelemetry tracer provider is process-global) that serves the
app in-process (httpx's ASGI transport, the FastAPI instrumentation included) and times every call
of the step loop's `LLMEngine.step`. With tracing on, spans go over OTLP/HTTP to a local receiver
that answers 200, so the exporter really serializes and sends. Runs alternate off/on so that a
busy patch of a shared machine slows both alike; medians are reported.

    .venv/bin/python -m bench.tracing_overhead [--rounds 3] [--requests 48] [--concurrency 8] [--max-tokens 32]

Default model: a random tiny Llama (bench/tiny.py) with two adapters, where a step is
shortest, so any per-step cost of tracing shows the most.
"""
from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _sink() -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        spans_bytes = 0

        def do_POST(self):
            Handler.spans_bytes += len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


async def _child(args) -> dict:
    import httpx

    from loraplex.engine.api.app import create_app
    from loraplex.engine.api.settings import ServerSettings
    from loraplex.engine.core.async_engine import AsyncEngine
    from loraplex.engine.core.config import EngineConfig
    from loraplex.engine.core.llm_engine import LLMEngine

    config = EngineConfig(model_id=args.model, served_model_name="base", device="cpu", num_threads=1,
                          num_kv_blocks=512, adapter_dir=args.adapter_dir, max_num_seqs=args.concurrency,
                          preload_adapters=args.adapters.split(","))
    engine = LLMEngine(config)
    step_seconds: list[float] = []
    inner = engine.step_core  # what the step loop thread runs

    def timed_step():
        n, t = engine.num_steps, time.perf_counter()
        out = inner()
        if engine.num_steps > n:  # a step that ran a batch (not an idle turn of the loop)
            step_seconds.append(time.perf_counter() - t)
        return out

    engine.step_core = timed_step
    app = create_app(AsyncEngine(engine), ServerSettings())
    adapters = ["base", *args.adapters.split(",")]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://engine", timeout=120) as client:
            sem = asyncio.Semaphore(args.concurrency)

            async def one(i: int) -> int:
                async with sem:
                    r = await client.post("/v1/completions", json={
                        "model": adapters[i % len(adapters)], "prompt": f"request {i} says", "max_tokens": args.max_tokens,
                        "ignore_eos": True, "temperature": 0})
                    r.raise_for_status()
                    return r.json()["usage"]["completion_tokens"]

            await one(0)  # warm-up (first forward, allocator)
            step_seconds.clear()
            t0 = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(i) for i in range(args.requests))))
            wall = time.perf_counter() - t0
    busy = step_seconds
    return {"tracing": args.mode, "steps": len(step_seconds), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "step_ms_mean": 1e3 * sum(busy) / max(1, len(busy)),
            "step_ms_median": 1e3 * statistics.median(busy) if busy else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default=None, help="checkpoint folder (default: a random tiny Llama)")
    p.add_argument("--adapter-dir", default=None)
    p.add_argument("--adapters", default="a1,a2", help="adapter folders under --adapter-dir")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="off", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(_child(args))))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from bench.tiny import make_tiny_adapter, make_tiny_checkpoint

            args.model = str(make_tiny_checkpoint(Path(tmp) / "base", family="llama"))
            args.adapter_dir = str(Path(tmp) / "adapters")
            for i, name in enumerate(args.adapters.split(",")):
                make_tiny_adapter(args.model, Path(args.adapter_dir) / name, rank=8, seed=i + 1)
        httpd, sink_url = _sink()
        results: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(args.rounds):
            for mode in ("off", "on"):
                env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
                env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
                if mode == "on":
                    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=sink_url, OTEL_BSP_SCHEDULE_DELAY="200")
                cmd = [sys.executable, "-m", "bench.tracing_overhead", "--child", "--mode", mode, "--model", args.model,
                       "--adapter-dir", args.adapter_dir, "--adapters", args.adapters, "--requests", str(args.requests),
                       "--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
                if out.returncode != 0:
                    print(out.stdout, out.stderr, file=sys.stderr)
                    return 1
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[mode].append(res)
                print(f"round {r + 1} tracing {mode:3}: {res['steps']} steps, step mean {res['step_ms_mean']:.2f} ms, "
                      f"median {res['step_ms_median']:.2f} ms, {res['tokens_per_s']:.0f} tok/s", flush=True)
        httpd.shutdown()
    med = {m: {k: statistics.median(x[k] for x in rs) for k in ("step_ms_mean", "step_ms_median", "tokens_per_s")}
           for m, rs in results.items()}
    print(f"\nmedians over {args.rounds} rounds ({args.requests} requests, concurrency {args.concurrency}, "
          f"{args.max_tokens} tokens each):")
    for m in ("off", "on"):
        print(f"  tracing {m:3}: step mean {med[m]['step_ms_mean']:.2f} ms, step median {med[m]['step_ms_median']:.2f} ms, "
              f"{med[m]['tokens_per_s']:.0f} tok/s")
    print(f"  on/off: step mean x{med['on']['step_ms_mean'] / med['off']['step_ms_mean']:.3f}, "
          f"throughput x{med['on']['tokens_per_s'] / med['off']['tokens_per_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
