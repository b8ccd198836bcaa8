"""HTTP-path throughput where request preparation dominates: chat templating, tokenization and
prompt validation, on the server's event loop (`--prepare-workers 0`, how it ran before) against
the prepare thread pool (the default).

Two `loraplex-engine` processes, one per mode, on a tiny random Llama (the forward costs
little, so the HTTP path is what is measured). Each runs three closed-loop workloads of
`--seconds` each, the modes alternating `--reps` times (the median is reported):
- `chat_n4`: chat completions of a ~700-token message with n=4 and max_tokens=1;
- `too_long`: completions of a ~20,000-token prompt, refused with 413 after tokenization;
- `streams_beside_too_long`: small streamed completions (32 tokens) while `too_long` runs
  beside them: their tokens/s and the p99 gap between chunks show how long the loop stalls.

    .venv/bin/python -m bench.http_prep [--seconds 15] [--concurrency 8] [--out FILE.json]

Compare runs on the same machine only (the numbers move with the CPU and its load).
"""
from __future__ import annotations

import argparse
import asyncio
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

from bench.assets import TINY_SHAPE, random_llama

WORDS = "loraplex serves many LoRA adapters on one base model. "
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_engine(model: Path, threads: int, prepare_workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).with_name("loraplex-engine")
    proc = subprocess.Popen([str(exe), "--model-id", str(model), "--device", "cpu", "--num-threads", str(threads),
                             "--num-kv-blocks", "2048", "--max-num-seqs", "64", "--max-waiting", "4096",
                             "--prepare-workers", str(prepare_workers),
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the engine exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the engine did not become ready in 120 s")


async def closed_loop(client: httpx.AsyncClient, make_request, concurrency: int, seconds: float) -> dict:
    """`concurrency` workers send requests back to back for `seconds`; counts by status."""
    statuses: dict[int, int] = {}
    end = time.monotonic() + seconds

    async def worker():
        while time.monotonic() < end:
            status = await make_request(client)
            statuses[status] = statuses.get(status, 0) + 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    return {"requests": sum(statuses.values()), "req_per_s": round(sum(statuses.values()) / elapsed, 2),
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


def chat_n4(message: str):
    async def send(client):
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": message}], "n": 4, "max_tokens": 1, "temperature": 0})
        return r.status_code
    return send


def too_long(prompt: str):
    async def send(client):
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
        return r.status_code
    return send


async def small_streams(client: httpx.AsyncClient, concurrency: int, seconds: float) -> dict:
    gaps: list[float] = []
    tokens = 0
    end = time.monotonic() + seconds

    async def worker():
        nonlocal tokens
        while time.monotonic() < end:
            body = {"prompt": WORDS, "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                last = time.monotonic()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now
                        tokens += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    gaps.sort()
    return {"chunks_per_s": round(tokens / elapsed, 1),
            "chunk_gap_p50_ms": round(1000 * statistics.median(gaps), 2) if gaps else None,
            "chunk_gap_p99_ms": round(1000 * gaps[int(0.99 * (len(gaps) - 1))], 2) if gaps else None}


async def run(url: str, seconds: float, concurrency: int, message: str, long_prompt: str) -> dict:
    results = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await client.post("/v1/completions", json={"prompt": WORDS, "max_tokens": 1})  # warm up
        results["chat_n4"] = await closed_loop(client, chat_n4(message), concurrency, seconds)
        results["too_long"] = await closed_loop(client, too_long(long_prompt), concurrency, seconds)
        streams, flood = await asyncio.gather(small_streams(client, 4, seconds),
                                              closed_loop(client, too_long(long_prompt), concurrency, seconds))
        results["streams_beside_too_long"] = {**streams, "too_long_req_per_s": flood["req_per_s"]}
    return results


def sized(model: Path, tokens: int) -> str:
    """WORDS repeated until the model's tokenizer makes about `tokens` tokens of it."""
    from transformers import AutoTokenizer

    per = len(AutoTokenizer.from_pretrained(model).encode(WORDS, add_special_tokens=False))
    return WORDS * max(1, tokens // per)


def median_of(runs: list[dict]) -> dict:
    """Per workload and numeric field, the median over the repetitions."""
    out = {}
    for workload in runs[0]:
        out[workload] = {k: statistics.median(r[workload][k] for r in runs)
                         for k, v in runs[0][workload].items() if isinstance(v, (int, float)) and v is not None}
    return out


def ratio(results: dict, workload: str, field: str) -> float | None:
    base = results["event_loop"][workload].get(field)
    return round(results["pool"][workload][field] / base, 2) if base else None


def with_chat_template(model: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the engine")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--prepare-workers", type=int, default=2, help="the pool mode's --prepare-workers")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="http-prep-") as tmp:
        model = with_chat_template(random_llama(Path(tmp) / "tiny-llama", TINY_SHAPE))
        modes = {"event_loop": 0, "pool": args.prepare_workers}
        engines = {mode: start_engine(model, args.threads, workers) for mode, workers in modes.items()}
        message, long_prompt = sized(model, 700), sized(model, 20000)
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        try:
            for _ in range(args.reps):
                for mode, (_, url) in engines.items():
                    runs[mode].append(asyncio.run(run(url, args.seconds, args.concurrency, message, long_prompt)))
        finally:
            for proc, _ in engines.values():
                proc.terminate()
                proc.wait(20)
    results = {mode: median_of(r) for mode, r in runs.items()}
    results["pool_vs_event_loop"] = {
        "chat_n4_req_per_s": ratio(results, "chat_n4", "req_per_s"),
        "too_long_req_per_s": ratio(results, "too_long", "req_per_s"),
        "stream_chunks_per_s": ratio(results, "streams_beside_too_long", "chunks_per_s"),
        "stream_chunk_gap_p99": ratio(results, "streams_beside_too_long", "chunk_gap_p99_ms")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"commit": commit, "seconds": args.seconds, "concurrency": args.concurrency, "reps": args.reps,
              "cores": os.cpu_count(), "results": results, "runs": runs}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
