"""The saturation point: what serving over HTTP costs when the engine never waits for work.

The same request list, every request arriving at t = 0 (far above capacity, so the batch stays
full), on adapters that target all seven projections (`assets.ALL_LINEAR`), is served

- in process: an `AsyncEngine` (the serving engine's own step and output threads) driven by an
  asyncio client in this process, and
- over HTTP: `loraplex-engine` as a subprocess, each request a streaming `/v1/completions`
  call with `logprobs: 0` (one SSE chunk per token), as the HTTP system of `bench.run` sends them,

the two taking turns for `rounds` rounds in one run (the order rotates every round, so a slow
patch of a shared machine hits both alike). Reported: output tokens per second of each replay, and
per round HTTP / in process, with its median and spread over the rounds. The CPU seconds of the
server process and of this process (the in-process engine, or the HTTP client) per replay say
where the cores went.

    .venv/bin/python -m bench.saturation --cache-dir ~/.cache/loraplex   # SmolLM2-135M, as bench.run
    .venv/bin/python -m bench.saturation --quick                          # tiny random model, seconds
    ... --compare-tree DIR   # also a server from another source tree (say, the previous revision
                             # exported with `git archive`), in the same rounds: a before/after

`bench.run` runs the same point (`run_point`) after its sweeps; `--skip-saturation` skips it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench import report, systems, workload
from bench.systems import Record, RunResult

log = logging.getLogger("bench")

IN_PROCESS = "in-process"
HTTP = "http"


def saturation_requests(num: int, num_adapters: int, input_range: tuple[int, int], output_range: tuple[int, int],
                        vocab_size: int, seed: int) -> list[workload.Request]:
    """`num` requests over `num_adapters` adapters (uniform), all arriving at t = 0."""
    spec = workload.WorkloadSpec(num_requests=num, rate=1.0, num_adapters=num_adapters, input_range=input_range,
                                 output_range=output_range, vocab_size=vocab_size, seed=seed)
    return [replace(r, arrival=0.0) for r in workload.generate(spec)]


# ---- CPU accounting ---------------------------------------------------------------------------

def _threads_cpu_s(pid: int) -> dict[int, float] | None:
    """User + system CPU seconds of each thread of a process (Linux /proc), by thread id; None
    where /proc cannot be read."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
    return out


class CpuMeter:
    """CPU seconds of this process and of the server process between start() and stop(), and
    of each one's busiest threads (the first is the step loop: it runs the forward passes)."""

    def __init__(self, server_pid: int | None):
        self.pids = {"bench": os.getpid(), **({"server": server_pid} if server_pid else {})}

    def start(self) -> "CpuMeter":
        self._before = {k: _threads_cpu_s(pid) for k, pid in self.pids.items()}
        return self

    def stop(self) -> dict:
        out: dict = {"server_cpu_s": None}
        for k, pid in self.pids.items():
            before, after = self._before[k], _threads_cpu_s(pid)
            if before is None or after is None:
                out[f"{k}_cpu_s"] = None
                continue
            per_thread = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
            out[f"{k}_cpu_s"] = round(sum(per_thread), 2)
            out[f"{k}_busiest_threads_cpu_s"] = [round(c, 2) for c in per_thread[:4]]
        return out


# ---- loraplex in process, through AsyncEngine -------------------------------------------------

def make_async_engine(model, settings: systems.EngineSettings, adapter_dir: Path):
    """An AsyncEngine on the same settings as the HTTP server (its step and output threads started)."""
    from loraplex.engine.core.async_engine import AsyncEngine

    return AsyncEngine(systems.make_engine(model, settings, adapter_dir)).start()


def run_async_inproc(engine, requests: list[workload.Request], adapter_names: list[str], label: str) -> RunResult:
    """Each request through `AsyncEngine.generate` at its arrival, from an asyncio client in this
    process: the engine's threads as the server runs them, with no HTTP in between."""
    from loraplex.engine.core.sampling_params import SamplingParams

    records = [Record(r.idx, r.adapter, r.arrival, len(r.prompt), r.output_len) for r in requests]

    async def one(rec: Record, r: workload.Request, t0: float) -> None:
        delay = t0 + r.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True, logprobs=0)
        try:
            async for out in engine.generate(list(r.prompt), params,
                                             adapter_names[r.adapter] if r.adapter >= 0 else None):
                if out.new_token_ids:
                    if rec.first_token is None:
                        rec.first_token = time.perf_counter() - t0
                    rec.tokens += len(out.new_token_ids)
                if out.finished and out.error:
                    rec.error = out.error
            rec.finish = time.perf_counter() - t0
        except Exception as exc:  # a failed request is a record with an error, not a crashed run
            rec.error = f"{type(exc).__name__}: {exc}"[:200]

    async def replay() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(rec, r, t0) for rec, r in zip(records, requests)))
        return time.perf_counter() - t0

    wall = asyncio.run(replay())
    return RunResult(label, records, wall)


# ---- the point --------------------------------------------------------------------------------

def server_source(env: dict | None = None) -> str:
    """Where a server started with this environment imports the HTTP layer from (a check that a
    subprocess runs the tree it is meant to, not an installed copy)."""
    proc = subprocess.run([sys.executable, "-c", "import loraplex.engine.api.lifecycle as m; print(m.__file__)"],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)
    return proc.stdout.strip() or proc.stderr.strip()[-300:]


def tree_env(tree: Path) -> dict:
    """PYTHONPATH for a source tree laid out as this repository (its four source roots)."""
    tree = tree.resolve()
    return {"PYTHONPATH": os.pathsep.join(str(tree / d) if d else str(tree)
                                          for d in ("", "engine", "kernels", "operator"))}


def beside_step_cpu_s(m: dict) -> float | None:
    """CPU seconds of everything but the step loop, taken as the busiest thread of the process
    that runs the engine (true wherever forward passes cost more than serving a token): the
    output thread, the event loop and the prepare pool, plus the HTTP client over HTTP."""
    engine_side = "server" if m.get("server_cpu_s") is not None else "bench"
    threads = m.get(f"{engine_side}_busiest_threads_cpu_s")
    if not threads or m.get("bench_cpu_s") is None:
        return None
    return (m["bench_cpu_s"] or 0) + (m.get("server_cpu_s") or 0) - threads[0]


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "per_round": [round(v, 4) for v in values]} if values else {}


def run_point(model, settings: systems.EngineSettings, adapters: list, adapter_dir: Path, work: Path,
              requests: list[workload.Request], warmup: list[workload.Request], rounds: int,
              compare_trees: tuple[Path, ...] = (), slo_ttft: float = 2.0) -> dict:
    """Serve `requests` in process and over HTTP (and over HTTP from each of `compare_trees`),
    in turns, `rounds` times; per-replay metrics and per-round ratios to the in-process replay."""
    names = [a.name for a in adapters]
    used = sorted({names[r.adapter] for r in requests + warmup if r.adapter >= 0})
    servers: dict[str, systems.HttpEngine] = {}
    sources: dict[str, str] = {}
    engine = None
    try:
        engine = make_async_engine(model, settings, adapter_dir)
        systems.register_adapters(engine, adapters, used)
        envs = {HTTP: None, **{f"{HTTP} ({t.name})": tree_env(t) for t in compare_trees}}
        for label, env in envs.items():
            sources[label] = server_source(env)
            log.info("saturation: %s server imports %s", label, sources[label])
            servers[label] = systems.HttpEngine(model, settings, adapters, adapter_dir,
                                                work / f"saturation-{len(servers)}", env=env)
            servers[label].warm(used, model.shape["vocab_size"])
        replays = {IN_PROCESS: lambda reqs, label: run_async_inproc(engine, reqs, names, label),
                   **{label: (lambda reqs, label, s=srv: s.replay(reqs, names, label)) for label, srv in servers.items()}}
        for label, fn in replays.items():  # warm-up, not recorded
            fn(warmup, label)
        pids = {label: srv.proc.pid for label, srv in servers.items()}
        runs: dict[str, list[dict]] = {label: [] for label in replays}
        order = list(replays)
        for k in range(rounds):
            # rotate the order every round: each system goes first as often as the others
            for label in order[k % len(order):] + order[:k % len(order)]:
                meter = CpuMeter(pids.get(label)).start()
                run = replays[label](requests, label)
                cpu = meter.stop()
                m = report.run_metrics(run, slo_ttft)
                m.pop("ttft_s", None)
                m.update(cpu, round=k)
                runs[label].append(m)
                log.info("saturation round %d %-22s %6.1f tok/s  CPU s: bench %s server %s  %s", k, label,
                         m["throughput_tok_s"], cpu.get("bench_busiest_threads_cpu_s"), cpu.get("server_busiest_threads_cpu_s"),
                         f"{m['errors']} errors: {m['first_error']}" if m["errors"] else "")
    finally:
        for srv in servers.values():
            srv.close()
        if engine is not None:
            engine.shutdown()
    inproc = [m["throughput_tok_s"] for m in runs[IN_PROCESS]]
    systems_out = {}
    for label, ms in runs.items():
        tok_s = [m["throughput_tok_s"] for m in ms]
        tokens = [m["throughput_tok_s"] * m["duration_s"] for m in ms]
        entry = {"tok_s": _spread(tok_s), "errors": sum(m["errors"] for m in ms),
                 "first_error": next((m["first_error"] for m in ms if m["first_error"]), None),
                 "ttft_p50_s": statistics.median(m["ttft_p50_s"] for m in ms if m["ttft_p50_s"] is not None)
                 if any(m["ttft_p50_s"] is not None for m in ms) else None,
                 "runs": ms}
        if label != IN_PROCESS:
            entry["ratio_vs_in_process"] = _spread([t / b for t, b in zip(tok_s, inproc) if b])
            entry["source"] = sources.get(label)
        cpu_per_ktok = [1000 * ((m["bench_cpu_s"] or 0) + (m["server_cpu_s"] or 0)) / t for m, t in zip(ms, tokens) if t]
        entry["cpu_s_per_1k_tokens"] = _spread(cpu_per_ktok)
        entry["beside_step_cpu_s_per_1k_tokens"] = _spread([1000 * beside_step_cpu_s(m) / t for m, t in zip(ms, tokens)
                                                            if t and beside_step_cpu_s(m) is not None])
        systems_out[label] = entry
    return {"requests": len(requests), "rounds": rounds, "workload": workload.summary(requests),
            "arrivals": "all at t = 0", "adapters": len(adapters), "target_modules": "all-linear (7 projections)",
            "max_num_seqs": settings.max_num_seqs, "systems": systems_out}


# ---- python -m bench.saturation ---------------------------------------------------------------

def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.saturation", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loraplex",
                    help="as bench.run: the demo checkpoint and <cache-dir>/bench's adapters (built if missing)")
    ap.add_argument("--random-model", action="store_true", help="a random Llama of SmolLM2's shape")
    ap.add_argument("--quick", action="store_true", help="tiny random model, a few requests (smoke test)")
    ap.add_argument("--tiny-model", action="store_true",
                    help="the tiny random Llama with the other settings as given: its steps take microseconds, so "
                         "the serving layer (event loop, SSE, client) is the bottleneck, a stress test of it")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=8, help="distinct all-linear adapters the requests spread over")
    ap.add_argument("--input-range", default="8-32")
    ap.add_argument("--output-range", default="8-32")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--ranks", default="4,8,16", help="adapter i gets ranks[i %% len(ranks)] (as bench.run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--compare-tree", type=Path, action="append", default=[],
                    help="also serve from this source tree (its engine/, kernels/, operator/ on PYTHONPATH)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the point as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.adapters, args.max_num_seqs = 6, 2, 2, 4
        args.input_range, args.output_range, args.ranks = "4-8", "2-6", "2,4"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server subprocess inherits it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    import torch

    from bench import assets, machine

    torch.set_num_threads(args.threads)
    lo_hi = lambda s: tuple(int(x) for x in s.split("-"))  # noqa: E731
    ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    load_before = machine.load_average()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loraplex-saturation-") as tmp:
        tiny = args.quick or args.tiny_model
        work = Path(tmp) if tiny else args.cache_dir.expanduser().resolve() / "bench"
        model = assets.main_model(None if args.random_model else args.cache_dir.expanduser().resolve(), work, tiny)
        adapter_dir = work / f"adapters-{'quick' if tiny else model.path.name}" / "all-linear"
        adapters = assets.make_adapters(model, adapter_dir, args.adapters, ranks, list(assets.ALL_LINEAR), prefix="all")
        input_range, output_range = lo_hi(args.input_range), lo_hi(args.output_range)
        settings = systems.EngineSettings(max_num_seqs=args.max_num_seqs,
                                          max_num_batched_tokens=max(256, args.max_num_seqs * 16),
                                          max_model_len=input_range[1] + output_range[1] + 16,
                                          max_active_adapters=max(args.adapters, 1) + 8,
                                          max_cpu_adapters=max(64, args.adapters + 8), max_lora_rank=max(ranks))
        vocab = model.shape["vocab_size"]
        requests = saturation_requests(args.requests, args.adapters, input_range, output_range, vocab, args.seed)
        warmup = saturation_requests(min(8, args.requests), args.adapters, input_range, (2, 4), vocab, args.seed + 1)
        point = run_point(model, settings, adapters, adapter_dir, Path(tmp), requests, warmup, args.rounds,
                          tuple(args.compare_tree))
    point["meta"] = {"model": model.label, "load_before": load_before, "load_after": machine.load_average(),
                     "git": machine.git_rev(), "threads": args.threads, "wall_s": time.perf_counter() - t0,
                     "command": "python -m bench.saturation " + " ".join(sys.argv[1:] if argv is None else argv)}
    print("\n".join(report.saturation_lines(point)))
    print(f"{model.label}; load average before {load_before}, after {point['meta']['load_after']}; "
          f"{point['meta']['wall_s']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(point, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
