"""`python -m bench.fleet_sim`: simulate a fleet of loraplex replicas under each routing policy.

    python -m bench.fleet_sim --replicas 4,16,64 --adapters 10000 [--out bench/results/fleet_sim]
    python -m bench.fleet_sim --quick          # seconds: a small fleet, invariants checked

See bench/README.md ("Fleet simulator") for the model, its fit and its validation.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from bench.fleet_sim import cost as cost_model
from bench.fleet_sim import report
from bench.fleet_sim.policies import POLICIES, make_policy
from bench.fleet_sim.replica import ReplicaConfig
from bench.fleet_sim.sim import FleetConfig, simulate
from bench.fleet_sim.workload import FleetWorkload, generate, summary

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("bench.fleet_sim")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def fairness(text: str) -> float | None:
    return None if text == "off" else float(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sim", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replicas", type=_ints, default=[4, 16, 64])
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--adapters", type=int, default=10_000)
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of adapter popularity")
    p.add_argument("--rate-per-replica", type=float, default=0.5, help="mean requests per second per replica")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds at the start left out of the metrics")
    p.add_argument("--burst-factor", type=float, default=3.0)
    p.add_argument("--burst-share", type=float, default=0.2)
    p.add_argument("--burst-mean", type=float, default=5.0, help="mean seconds of a burst")
    p.add_argument("--input-range", type=_ints, default=[8, 32])
    p.add_argument("--output-range", type=_ints, default=[8, 32])
    p.add_argument("--device-slots", type=int, default=8)
    p.add_argument("--host-slots", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--adapter-fairness-seconds", type=fairness, default=0.0,
                   help="the engine's slot-fairness aging time (its default: 0); 'off': the engine before that rule")
    p.add_argument("--scrape-interval", type=float, default=0.05,
                   help="seconds between the router's scrapes (the EPP's --refresh-metrics-interval default: 50 ms)")
    p.add_argument("--gie-weights", type=_floats, default=(2.0, 2.0, 1.0), help="queue,kv,lora-affinity scorer weights")
    p.add_argument("--costs", type=Path, default=cost_model.DEFAULT_DATA, help="measured engine costs (JSON)")
    p.add_argument("--disk-load-scale", type=float, default=1.0,
                   help="multiply the measured disk -> host load times (e.g. 20: ~1 s, a fetch from an object store)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="check the cache and conservation invariants while running")
    p.add_argument("--quick", action="store_true", help="a small fleet for seconds; implies --strict")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/fleet_sim (quick: bench/results/latest/fleet_sim)")
    args = p.parse_args(argv)
    if args.quick:
        args.replicas, args.adapters, args.duration, args.warmup = [1, 2, 4], 300, 60.0, 10.0
        args.strict = True
    args.policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    bad = set(args.policies) - set(POLICIES)
    if bad:
        p.error(f"unknown policies {sorted(bad)}; choose from {', '.join(POLICIES)}")
    if args.out is None:
        args.out = ROOT / "bench" / "results" / ("latest/fleet_sim" if args.quick else "fleet_sim")
    return args


def winners(runs: list[dict]) -> list[str]:
    """One line per replica count: the best policy on TTFT p99, with its margin over the others."""
    lines = []
    for n in sorted({r["replicas"] for r in runs}):
        rows = {r["policy"]: r["metrics"] for r in runs if r["replicas"] == n}
        best = min(rows, key=lambda p: rows[p]["ttft_p99_s"])
        b = rows[best]
        others = ", ".join(f"{p} {m['ttft_p99_s']:.2f} s ({m['ttft_p99_s'] / b['ttft_p99_s']:.1f}x)"
                           for p, m in rows.items() if p != best)
        hits = max(rows, key=lambda p: rows[p]["warm_hit_rate"])
        lines.append(f"{n} replicas: **{best}** has the lowest TTFT p99, {b['ttft_p99_s']:.2f} s (p50 {b['ttft_p50_s']:.2f} s, "
                     f"warm-hit {b['warm_hit_rate']:.1%}, {b['cold_loads_per_s']:.2f} cold loads/s); {others}. "
                     f"Highest warm-hit rate: {hits} ({rows[hits]['warm_hit_rate']:.1%}; random "
                     f"{rows.get('random', {}).get('warm_hit_rate', float('nan')):.1%}).")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    costs = cost_model.load(args.costs)
    if args.disk_load_scale != 1.0:
        costs = costs.with_disk_loads_scaled(args.disk_load_scale)
    rcfg = ReplicaConfig(device_slots=args.device_slots, host_slots=args.host_slots, max_num_seqs=args.max_num_seqs,
                         adapter_fairness_s=args.adapter_fairness_seconds)
    t0 = time.perf_counter()
    runs, workloads = [], {}
    for n in args.replicas:
        spec = FleetWorkload(num_adapters=args.adapters, zipf_s=args.zipf, rate=args.rate_per_replica * n,
                             duration_s=args.duration, burst_factor=args.burst_factor, burst_share=args.burst_share,
                             burst_mean_s=args.burst_mean, input_range=tuple(args.input_range),
                             output_range=tuple(args.output_range), seed=args.seed)
        trace = generate(spec)
        workloads[n] = summary(trace, spec)
        fleet = FleetConfig(replicas=n, replica=rcfg, scrape_interval_s=args.scrape_interval, warmup_s=args.warmup)
        for name in args.policies:
            policy = make_policy(name, n, args.seed, args.gie_weights)
            m = simulate(spec, trace, fleet, policy, costs, seed=args.seed, strict=args.strict)
            runs.append({"replicas": n, "policy": name, "metrics": m})
            log.info("%3d replicas %-12s ttft p50 %.2fs p99 %.2fs  warm-hit %.1f%%  cold %.2f/s  tok/s %.0f  (%.1fs)",
                     n, name, m["ttft_p50_s"], m["ttft_p99_s"], 100 * m["warm_hit_rate"], m["cold_loads_per_s"],
                     m["throughput_tok_s"], m["sim_wall_s"])
    data = json.loads(Path(args.costs).read_text())
    cols = data["columns"]
    samples = [(s[cols.index("seconds")], costs.step_seconds(s[cols.index("rows")], s[cols.index("prefill_tokens")],
                                                             s[cols.index("distinct_adapters")])) for s in data["step_samples"]]
    result = {
        "meta": {"command": "python -m bench.fleet_sim " + shlex.join(sys.argv[1:] if argv is None else argv),
                 "seed": args.seed, "wall_s": time.perf_counter() - t0, "rate_per_replica": args.rate_per_replica,
                 "warmup_s": args.warmup, "scrape_interval_s": args.scrape_interval, "gie_weights": list(args.gie_weights),
                 "disk_load_scale": args.disk_load_scale,
                 "replica": rcfg.__dict__, "quick": args.quick, "strict": args.strict},
        "workload": spec.describe() | {"rate": "rate_per_replica x replicas"},
        "workload_summary": workloads,
        "fit": costs.coefficients() | {k: v for k, v in costs.fit.items()},
        "runs": runs,
        "summary": winners(runs),
        "fit_samples": samples,
    }
    report.write(result, args.out)
    log.info("results in %s", args.out)
    for line in result["summary"]:
        log.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
