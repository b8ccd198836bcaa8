"""The fairness point: two tenants of equal weight, one sending ten times the other's rate, under
`--tenant-scheduling fcfs` and `vtc`, in one run, in process on one engine.

    .venv/bin/python -m bench.fairness --cache-dir ~/.cache/loraplex   # the bench's model
    .venv/bin/python -m bench.fairness --quick                         # tiny random model, seconds

Method (docs/engine.md "Fairness across tenants"):
1. Arrivals run on the engine's step clock: before step k, the requests of step k are added
   (Poisson counts per step, seeded). The offered load is then a fixed share of what the engine
   serves per step, whatever the speed of a shared machine at the moment; latencies are still
   wall-clock seconds, from the start of the step a request arrived before.
2. Capacity: the engine serves a closed loop of 2 x max_num_seqs requests of the point's shape
   (prompt and output lengths uniform in a range); C = output tokens a step over the mean
   output length, in requests a step.
3. "light" sends rho x C requests a step (default rho = 0.5: exactly its fair half), "heavy" ten
   times that, for `window` steps. The same arrivals in every replay.
4. Replays, one after the other on the same engine: light alone (its solo run), both under fcfs,
   both under vtc. After the window no new request comes; the replay goes on until every light
   request has its first token, at most `drain` steps, then what is left is aborted.
5. Figures: each tenant's share of the output tokens generated from step `warm` (the batch has
   filled and its first requests have ended: the steady state) to the end of the window; the light
   tenant's time to first token p50 and p99, in seconds and in steps, against its solo run. A
   light request with no first token by the end counts its wait until then (a lower bound; the
   report says how many).

Goal: under vtc the light tenant keeps >= 45% of the output tokens and its TTFT p99 within 2x
of its solo run; fcfs gives it about a tenth. What limits the TTFT: admission does not preempt,
so with the heavy tenant keeping every slot of the batch busy a light request waits for a slot
to free, and a tenant asking for its whole fair share queues behind its own requests; on a CPU
a full batch's step also takes several times a small batch's.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("bench")
TENANTS = ("light", "heavy")


@dataclass
class Arrival:
    step: int  # added just before this step
    tenant: str
    prompt: list[int]
    output_len: int


@dataclass
class Shape:
    """Request lengths, uniform in [lo, hi]: varied lengths keep the batch's requests from ending
    in the same step (a batch admitted together would free its slots together)."""
    prompt: tuple[int, int] = (16, 32)
    output: tuple[int, int] = (8, 24)

    def draw(self, rng: random.Random, vocab: int) -> tuple[list[int], int]:
        return [rng.randrange(vocab) for _ in range(rng.randint(*self.prompt))], rng.randint(*self.output)


def make_arrivals(per_step_light: float, ratio: float, window: int, shape: Shape, vocab: int,
                  seed: int) -> list[Arrival]:
    rng, counts = random.Random(seed), np.random.default_rng(seed)
    out = []
    for step in range(window):
        for tenant, lam in (("light", per_step_light), ("heavy", ratio * per_step_light)):
            out += [Arrival(step, tenant, *shape.draw(rng, vocab)) for _ in range(counts.poisson(lam))]
    return out


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


def capacity(engine, shape: Shape, vocab: int, steps: int, seed: int) -> float:
    """Requests served per step at a full batch: a closed loop of 2 x max_num_seqs, output
    tokens counted after a first stretch that fills the batch, over the mean output length
    (tokens, not finished requests: many per step, so a short count is steady)."""
    rng = random.Random(seed)
    ids = iter(range(10 ** 9))

    def add():
        _add(engine, f"cal-{next(ids)}", *shape.draw(rng, vocab), "cal")

    for _ in range(2 * engine.config.max_num_seqs):
        add()
    warm, tokens = shape.output[0], 0
    for step in range(warm + steps):
        for out in engine.step():
            tokens += len(out.new_token_ids) if step >= warm else 0
            if out.finished:
                add()
    _abort_all(engine)
    return tokens / steps / (sum(shape.output) / 2)


def replay(engine, policy: str, arrivals: list[Arrival], window: int, drain: int, warm: int) -> dict:
    """Add each step's arrivals before it, step until the window is over and every light request
    has its first token (at most `drain` steps more), abort the rest."""
    engine.scheduler.config.tenant_scheduling = policy  # read at every schedule(); the engine is idle
    by_step: dict[int, list[Arrival]] = {}
    for a in arrivals:
        by_step.setdefault(a.step, []).append(a)
    arrived: dict[str, tuple[str, int, float]] = {}  # request id -> (tenant, step, wall time)
    first: dict[str, tuple[int, float]] = {}
    tokens = {t: 0 for t in TENANTS}
    light_left, step, busy = 0, 0, 0.0
    t0 = time.perf_counter()
    while step < window or (light_left and step < window + drain):
        now = time.perf_counter()
        for i, a in enumerate(by_step.get(step, [])):
            rid = f"{a.tenant}-{step}-{i}"
            arrived[rid] = (a.tenant, step, now)
            light_left += a.tenant == "light"
            _add(engine, rid, a.prompt, a.output_len, a.tenant)
        outputs = engine.step()
        end = time.perf_counter()
        busy += end - now
        for out in outputs:
            if out.new_token_ids:
                tenant = arrived[out.request_id][0]
                if out.request_id not in first:
                    first[out.request_id] = (step, end)
                    light_left -= tenant == "light"
                if warm <= step < window:
                    tokens[tenant] += len(out.new_token_ids)
        step += 1
    end_step, end = step, time.perf_counter()
    _abort_all(engine)
    light = [r for r, (t, _, _) in arrived.items() if t == "light"]
    ttft_s = [first.get(r, (0, end))[1] - arrived[r][2] for r in light]
    ttft_steps = [first.get(r, (end_step, 0))[0] - arrived[r][1] + 1 for r in light]
    total = sum(tokens.values())
    return {
        "policy": policy, "requests": {t: sum(1 for v in arrived.values() if v[0] == t) for t in TENANTS},
        "tokens_in_window": tokens, "share": {t: tokens[t] / total if total else 0.0 for t in TENANTS},
        "light_ttft_p50_s": float(np.percentile(ttft_s, 50)), "light_ttft_p99_s": float(np.percentile(ttft_s, 99)),
        "light_ttft_p50_steps": float(np.percentile(ttft_steps, 50)),
        "light_ttft_p99_steps": float(np.percentile(ttft_steps, 99)),
        "light_without_first_token": light_left, "steps": end_step, "mean_step_ms": 1000 * busy / max(1, end_step),
        "wall_s": end - t0,
    }


def run_fairness_point(model_path: Path, *, max_num_seqs: int = 32, shape: Shape | None = None, rho: float = 0.5,
                       ratio: float = 10.0, window: int = 48, drain: int = 16, warm: int = 16, calibrate_steps: int = 12,
                       vocab: int = 50000, seed: int = 0, threads: int | None = None) -> dict:
    from loraplex.engine.core.config import EngineConfig
    from loraplex.engine.core.llm_engine import LLMEngine

    t_start = time.perf_counter()
    shape = shape or Shape()
    max_len = shape.prompt[1] + shape.output[1] + 16
    engine = LLMEngine(EngineConfig(
        model_id=str(model_path), device="cpu", dtype="float32", num_threads=threads, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(256, 16 * max_num_seqs), max_model_len=max_len, max_waiting=10 ** 6,
        num_kv_blocks=2 * max_num_seqs * -(-max_len // 16) + 8,  # no preemption: the point is about admission
        enable_prefix_caching=False))
    vocab = min(vocab, engine.model_config.vocab_size)
    try:
        cap = capacity(engine, shape, vocab, calibrate_steps, seed)
        both = make_arrivals(rho * cap, ratio, window, shape, vocab, seed + 1)
        solo = replay(engine, "vtc", [a for a in both if a.tenant == "light"], window, drain, warm)
        runs = {p: replay(engine, p, both, window, drain, warm) for p in ("fcfs", "vtc")}
    finally:
        engine.shutdown()
    for r in runs.values():
        for q in ("p50", "p99"):
            r[f"light_ttft_{q}_vs_solo"] = r[f"light_ttft_{q}_s"] / solo[f"light_ttft_{q}_s"]
            r[f"light_ttft_{q}_steps_vs_solo"] = r[f"light_ttft_{q}_steps"] / solo[f"light_ttft_{q}_steps"]
    vtc = runs["vtc"]
    return {
        "setup": {"max_num_seqs": max_num_seqs, "prompt_len": list(shape.prompt), "output_len": list(shape.output),
                  "rho": rho, "ratio": ratio, "window_steps": window, "drain_steps": drain, "warm_steps": warm,
                  "capacity_req_per_step": cap, "light_req_per_step": rho * cap, "heavy_req_per_step": ratio * rho * cap,
                  "seed": seed, "weights": "1 and 1"},
        "solo": solo, "fcfs": runs["fcfs"], "vtc": vtc,
        "goal_met": vtc["share"]["light"] >= 0.45 and vtc["light_ttft_p99_vs_solo"] <= 2.0,
        "wall_s": time.perf_counter() - t_start,
    }


def markdown(point: dict) -> list[str]:
    s = point["setup"]

    def row(name: str, r: dict, solo: bool = False) -> list[str]:
        censored = r["light_without_first_token"]
        at_least = " (≥)" if censored else ""
        return [name, f"{r['share']['light']:.1%}", "–" if solo else f"{r['share']['heavy']:.1%}",
                f"{1000 * r['light_ttft_p50_s']:.0f} / {1000 * r['light_ttft_p99_s']:.0f}{at_least}",
                "–" if solo else f"{r['light_ttft_p50_vs_solo']:.2f} / {r['light_ttft_p99_vs_solo']:.2f}",
                f"{r['light_ttft_p50_steps']:.0f} / {r['light_ttft_p99_steps']:.0f}{at_least}",
                f"{r['mean_step_ms']:.0f}", f"{r['requests']['light']} / {r['requests']['heavy']}", str(censored)]

    headers = ["run", "light share of output tokens", "heavy share", "light TTFT p50 / p99 ms", "vs solo",
               "light TTFT p50 / p99 steps", "mean step ms", "requests light / heavy", "light without a first token"]
    rows = [row("light alone", point["solo"], solo=True), row("fcfs", point["fcfs"]), row("vtc", point["vtc"])]
    table = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |" for r in rows]
    return [
        "## Fairness across tenants (equal weights, one tenant at 10x the other's rate)", "",
        f"In process, one engine, `--max-num-seqs {s['max_num_seqs']}`; prompts of {s['prompt_len'][0]}-{s['prompt_len'][1]} "
        f"and outputs of {s['output_len'][0]}-{s['output_len'][1]} tokens, uniform. Arrivals on the step clock (Poisson "
        f"counts per step): capacity measured first, {s['capacity_req_per_step']:.2f} requests finished a step at a full "
        f"batch; light sends {s['light_req_per_step']:.2f} a step ({s['rho']:g} x capacity), heavy "
        f"{s['heavy_req_per_step']:.2f}, for {s['window_steps']} steps. Shares count the output tokens of steps "
        f"{s['warm_steps']} to {s['window_steps']} (the batch full, its first requests done); "
        "TTFT runs from the start of the step the request arrived before, in seconds and in steps; a light request "
        "still without a first token at the end counts its wait until then (≥).", "",
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
    p.add_argument("--window", type=int, default=48, help="steps with arrivals")
    p.add_argument("--drain", type=int, default=16, help="at most this many steps after the window for light first tokens")
    p.add_argument("--warm", type=int, default=16, help="steps before the token shares are counted")
    p.add_argument("--rho", type=float, default=0.5, help="light's rate as a share of the measured capacity")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/fairness.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.window, args.drain, args.warm, args.max_num_seqs = 16, 8, 4, 8
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
                                   drain=args.drain, warm=args.warm, calibrate_steps=8 if args.quick else 12, seed=args.seed,
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
