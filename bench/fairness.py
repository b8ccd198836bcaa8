"""The fairness point: two tenants of equal weight, one sending ten times the other's rate, under
`--tenant-scheduling fcfs` and `vtc`, in one run, in process on one engine.

    .venv/bin/python -m bench.fairness --cache-dir ~/.cache/loraplex   # the bench's model
    .venv/bin/python -m bench.fairness --quick                         # tiny random model, seconds

Method (docs/engine.md "Fairness across tenants"):
1. Capacity: the engine serves a closed loop of 2 x max_num_seqs requests of the point's shape
   (fixed prompt and output lengths) for a few seconds; capacity C = output tokens/s over
   output length, in requests/s.
2. Arrivals: Poisson, seeded. "light" sends at rate rho x C (default rho = 0.45: a little under
   its fair half), "heavy" at ten times that, for `window` seconds. The same arrival lists in
   every replay.
3. Replays, one after the other on the same engine: light alone (its solo run), both under fcfs,
   both under vtc. Each request is added at its arrival time (LLMEngine stepped from this thread,
   as bench.systems does). After the window no new request comes; the replay goes on until
   every light request has its first token, at most `drain` seconds, then what is left is
   aborted.
4. Figures: each tenant's share of the output tokens generated during the window; the light
   tenant's TTFT (from its scheduled arrival) p50 and p99, against its solo run. A light
   request with no first token by the end counts its wait until the end (a lower bound; the
   report says how many).

Goal: under vtc the light tenant keeps >= 45% of the output tokens and its TTFT p99 within 2x
of its solo run; fcfs gives it about a tenth.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("bench")
TENANTS = ("light", "heavy")


@dataclass
class Arrival:
    at: float  # seconds since the replay started
    tenant: str
    prompt: list[int]


def make_arrivals(rate_light: float, ratio: float, window: float, prompt_len: int, vocab: int,
                  seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    out = []
    for tenant, rate in (("light", rate_light), ("heavy", ratio * rate_light)):
        t = rng.expovariate(rate)
        while t < window:
            out.append(Arrival(t, tenant, [rng.randrange(vocab) for _ in range(prompt_len)]))
            t += rng.expovariate(rate)
    return sorted(out, key=lambda a: a.at)


def _add(engine, rid: str, prompt: list[int], output_len: int, tenant: str):
    """LLMEngine.add_request, with the tenant set between validation and queueing (as the HTTP
    layer does)."""
    from loraplex.engine.core.sampling_params import SamplingParams

    seq = engine.make_sequence(rid, prompt, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    seq.tenant = tenant
    engine.add_sequence(seq)
    engine.output_processor.add_request(seq)


def _abort_all(engine) -> None:
    for rid in list(engine.requests):
        engine.abort(rid)
    if engine.scheduler.waiting or engine.scheduler.running:
        raise RuntimeError("the engine is not idle after aborting every request")


def capacity(engine, prompt_len: int, output_len: int, vocab: int, seconds: float, seed: int) -> float:
    """Requests/s the engine sustains at a full batch: a closed loop of 2 x max_num_seqs."""
    rng = random.Random(seed)
    n = 2 * engine.config.max_num_seqs
    ids = iter(range(10 ** 9))

    def add():
        _add(engine, f"cal-{next(ids)}", [rng.randrange(vocab) for _ in range(prompt_len)], output_len, "cal")

    for _ in range(n):
        add()
    t0 = time.perf_counter()
    warm, tokens = t0 + min(1.0, seconds / 4), 0
    while time.perf_counter() < t0 + seconds:
        for out in engine.step():
            if time.perf_counter() >= warm:
                tokens += len(out.new_token_ids)
            if out.finished:
                add()
    _abort_all(engine)
    return tokens / (time.perf_counter() - warm) / output_len


def replay(engine, policy: str, arrivals: list[Arrival], window: float, drain: float, output_len: int) -> dict:
    """Add each request at its time, step until the window is over and every light request has
    its first token (at most `drain` seconds more), abort the rest."""
    engine.scheduler.config.tenant_scheduling = policy  # read at every schedule(); the engine is idle
    pending = deque(arrivals)
    arrival_of, tenant_of, first = {}, {}, {}
    light_left = 0  # light requests added and still without a first token
    tokens = {t: 0 for t in TENANTS}
    steps, i = 0, 0
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter() - t0
        while pending and pending[0].at <= now:
            a = pending.popleft()
            rid = f"{a.tenant}-{i}"
            i += 1
            arrival_of[rid], tenant_of[rid] = a.at, a.tenant
            light_left += a.tenant == "light"
            _add(engine, rid, a.prompt, output_len, a.tenant)
        if not pending and (now >= window + drain or (now >= window and not light_left)):
            break
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(pending[0].at if pending else window, window + drain) - now))
            continue
        outputs = engine.step()
        steps += 1
        t = time.perf_counter() - t0
        for out in outputs:
            if out.new_token_ids:
                if out.request_id not in first:
                    first[out.request_id] = t
                    light_left -= tenant_of[out.request_id] == "light"
                if t <= window:
                    tokens[tenant_of[out.request_id]] += len(out.new_token_ids)
    end = time.perf_counter() - t0
    _abort_all(engine)
    light = [r for r in arrival_of if tenant_of[r] == "light"]
    ttft = [first.get(r, end) - arrival_of[r] for r in light]
    total = sum(tokens.values())
    return {
        "policy": policy, "requests": {t: sum(1 for r in arrival_of if tenant_of[r] == t) for t in TENANTS},
        "tokens_in_window": tokens, "share": {t: tokens[t] / total if total else 0.0 for t in TENANTS},
        "light_ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else None,
        "light_ttft_p99_s": float(np.percentile(ttft, 99)) if ttft else None,
        "light_without_first_token": sum(1 for r in light if r not in first),
        "steps": steps, "wall_s": end,
    }


def run_fairness_point(model_path: Path, *, max_num_seqs: int = 32, prompt_len: int = 24, output_len: int = 16,
                       rho: float = 0.45, ratio: float = 10.0, window: float = 15.0, drain: float = 10.0,
                       calibrate_s: float = 4.0, vocab: int = 50000, seed: int = 0, threads: int | None = None) -> dict:
    from loraplex.engine.core.config import EngineConfig
    from loraplex.engine.core.llm_engine import LLMEngine

    t_start = time.perf_counter()
    max_len = prompt_len + output_len + 16
    engine = LLMEngine(EngineConfig(
        model_id=str(model_path), device="cpu", dtype="float32", num_threads=threads, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(256, 16 * max_num_seqs), max_model_len=max_len, max_waiting=10 ** 6,
        num_kv_blocks=2 * max_num_seqs * -(-max_len // 16) + 8,  # no preemption: the point is about admission
        enable_prefix_caching=False))
    vocab = min(vocab, engine.model_config.vocab_size)
    try:
        cap = capacity(engine, prompt_len, output_len, vocab, calibrate_s, seed)
        rate = rho * cap
        both = make_arrivals(rate, ratio, window, prompt_len, vocab, seed + 1)
        solo = replay(engine, "vtc", [a for a in both if a.tenant == "light"], window, drain, output_len)
        runs = {p: replay(engine, p, both, window, drain, output_len) for p in ("fcfs", "vtc")}
    finally:
        engine.shutdown()
    for r in runs.values():
        r["light_ttft_p50_vs_solo"] = r["light_ttft_p50_s"] / solo["light_ttft_p50_s"]
        r["light_ttft_p99_vs_solo"] = r["light_ttft_p99_s"] / solo["light_ttft_p99_s"]
    vtc = runs["vtc"]
    return {
        "setup": {"max_num_seqs": max_num_seqs, "prompt_len": prompt_len, "output_len": output_len, "rho": rho,
                  "ratio": ratio, "window_s": window, "drain_s": drain, "capacity_req_s": cap,
                  "light_rate_req_s": rate, "heavy_rate_req_s": ratio * rate, "seed": seed, "weights": "1 and 1"},
        "solo": solo, "fcfs": runs["fcfs"], "vtc": vtc,
        "goal_met": vtc["share"]["light"] >= 0.45 and vtc["light_ttft_p99_vs_solo"] <= 2.0,
        "wall_s": time.perf_counter() - t_start,
    }


def markdown(point: dict) -> list[str]:
    s = point["setup"]

    def row(name: str, r: dict, solo: bool = False) -> list[str]:
        censored = r["light_without_first_token"]
        return [name, f"{r['share']['light']:.1%}", f"{r['share']['heavy']:.1%}" if not solo else "–",
                f"{1000 * r['light_ttft_p50_s']:.0f}", f"{1000 * r['light_ttft_p99_s']:.0f}" + (" (≥)" if censored else ""),
                "1" if solo else f"{r['light_ttft_p50_vs_solo']:.2f} / {r['light_ttft_p99_vs_solo']:.2f}",
                f"{r['requests']['light']} / {r['requests']['heavy']}", str(censored)]

    headers = ["run", "light share of output tokens", "heavy share", "light TTFT p50 ms", "light TTFT p99 ms",
               "p50 / p99 vs solo", "requests light / heavy", "light without a first token"]
    rows = [row("light alone", point["solo"], solo=True), row("fcfs", point["fcfs"]), row("vtc", point["vtc"])]
    table = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |" for r in rows]
    return [
        "## Fairness across tenants (equal weights, one tenant at 10x the other's rate)", "",
        f"In process, one engine, `--max-num-seqs {s['max_num_seqs']}`, every request {s['prompt_len']} prompt + "
        f"{s['output_len']} output tokens. Capacity measured first: {s['capacity_req_s']:.2f} req/s; light sends "
        f"{s['light_rate_req_s']:.2f} req/s ({s['rho']:g} x capacity), heavy {s['heavy_rate_req_s']:.2f} req/s, Poisson, "
        f"for {s['window_s']:g} s. Shares count the output tokens generated in that window; TTFT is from the "
        "scheduled arrival; a light request still without a first token at the end counts its wait until then (≥).", "",
        *table, "",
        f"Goal (light ≥ 45% of tokens and TTFT p99 within 2x of solo under vtc): {'met' if point['goal_met'] else 'not met'}. "
        f"Point wall time {point['wall_s']:.0f} s.", "",
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.fairness", description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None, help="where the SmolLM2 demo checkpoint lives (is built)")
    p.add_argument("--model-dir", type=Path, default=None, help="a checkpoint folder to use as it is (overrides --cache-dir)")
    p.add_argument("--quick", action="store_true", help="tiny random model, short window: a smoke test")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--window", type=float, default=15.0, help="seconds of arrivals")
    p.add_argument("--drain", type=float, default=10.0, help="at most this long after the window for light first tokens")
    p.add_argument("--rho", type=float, default=0.45, help="light's rate as a share of the measured capacity")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/fairness.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.window, args.drain, args.max_num_seqs = 3.0, 3.0, 8
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from bench import assets

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fairness-") as work:
        model = assets.chosen_model(args.model_dir, args.cache_dir, Path(work), args.quick)
        point = run_fairness_point(model.path, max_num_seqs=args.max_num_seqs, rho=args.rho, window=args.window,
                                   drain=args.drain, calibrate_s=1.5 if args.quick else 4.0, seed=args.seed,
                                   threads=args.threads)
    point["model"] = model.label
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(point, indent=2))
    print(f"model: {model.label} ({model.source}), {args.threads} thread(s)")
    print("\n".join(markdown(point)))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
