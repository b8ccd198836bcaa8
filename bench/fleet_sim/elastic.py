"""`python -m bench.fleet_sim.elastic`: an elastic fleet under a skewed, shifting, diurnal workload.

    python -m bench.fleet_sim.elastic [--replicas 4,16,64] [--out bench/results/fleet_sim/elastic]
    python -m bench.fleet_sim.elastic --quick      # seconds: a small fleet, invariants checked

For every fleet size n, fleet mode (fixed n pods; the operator's autoscaler with at most n;
the same with scale to zero), placement (fixed, auto) and routing policy it simulates one
compressed day (fleet.py, placement.py) and reports TTFT p50/p99, cold loads per minute and
GPU-hours; then whether the issue's goal holds at the largest n: TTFT p99 at least 5x lower
than random routing with fixed placement on the fixed fleet, at equal or fewer GPU-hours.
See bench/README.md ("Elastic fleet").
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from bench.fleet_sim import cost as cost_model
from bench.fleet_sim import elastic_report
from bench.fleet_sim.fleet import ScaleRule, simulate_elastic, timeline
from bench.fleet_sim.placement import PlacementRule
from bench.fleet_sim.policies import ELASTIC_POLICIES, make_policy
from bench.fleet_sim.replica import ReplicaConfig
from bench.fleet_sim.workload import FleetWorkload, generate, summary

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("bench.fleet_sim")
GOAL_RATIO = 5.0
BASELINE = ("fixed", "fixed", "random")  # fleet, placement, policy


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sim.elastic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replicas", type=_ints, default=[4, 16, 64], help="fleet sizes n (the autoscaler's max)")
    p.add_argument("--policies", type=_names, default=list(ELASTIC_POLICIES))
    p.add_argument("--placements", type=_names, default=["fixed", "auto"])
    p.add_argument("--fleets", type=_names, default=["fixed", "hpa", "zero"])
    w = p.add_argument_group("workload")
    w.add_argument("--adapters", type=int, default=10_000)
    w.add_argument("--zipf", type=float, default=1.0)
    w.add_argument("--rate-per-replica", type=float, default=0.5, help="mean req/s per replica of n, over the day")
    w.add_argument("--duration", type=float, default=7200.0, help="seconds simulated")
    w.add_argument("--day", type=float, default=7200.0, help="seconds of one diurnal period (a compressed day)")
    w.add_argument("--night-share", type=float, default=0.25, help="share of the period that is quiet night")
    w.add_argument("--night-rate", type=float, default=0.001, help="req/s during the night, whole fleet")
    w.add_argument("--shift-every", type=float, default=600.0, help="seconds between popularity shifts")
    w.add_argument("--shift-top", type=int, default=100)
    w.add_argument("--shift-prob", type=float, default=0.5)
    w.add_argument("--burst-factor", type=float, default=2.0)
    w.add_argument("--burst-share", type=float, default=0.1)
    w.add_argument("--burst-mean", type=float, default=5.0)
    w.add_argument("--warmup", type=float, default=60.0)
    r = p.add_argument_group("replica")
    r.add_argument("--device-slots", type=int, default=8)
    r.add_argument("--host-slots", type=int, default=64)
    r.add_argument("--max-num-seqs", type=int, default=32)
    r.add_argument("--adapter-fairness-seconds", type=float, default=0.0)
    r.add_argument("--fifo-loads", action="store_true",
                   help="what-if: one FIFO load queue, warm-up loads and request loads alike (the engine before "
                        "request loads went first; the committed elastic results)")
    r.add_argument("--disk-load-scale", type=float, default=1.0)
    r.add_argument("--costs", type=Path, default=cost_model.DEFAULT_DATA)
    pl = p.add_argument_group("placement")
    pl.add_argument("--fixed-replicas", type=int, default=2)
    pl.add_argument("--auto-min", type=int, default=2)
    pl.add_argument("--auto-max", type=int, default=0, help="0: every pod")
    pl.add_argument("--target-rps", type=float, default=0.25, help="auto: targetRequestsPerPod (req/s)")
    pl.add_argument("--window", type=float, default=60.0)
    pl.add_argument("--cooldown", type=float, default=300.0)
    pl.add_argument("--placement-interval", type=float, default=15.0)
    s = p.add_argument_group("autoscaling")
    s.add_argument("--max-factor", type=float, default=1.5, help="autoscaler maxReplicas = round(factor x n)")
    s.add_argument("--min-replicas", type=int, default=1)
    s.add_argument("--hpa-metric", default="num_requests_running")
    s.add_argument("--hpa-target", type=float, default=4.0, help="the operator's default is 8")
    s.add_argument("--down-window", type=float, default=300.0)
    s.add_argument("--scale-interval", type=float, default=15.0)
    s.add_argument("--idle", type=float, default=300.0, help="scale to zero after this long idle (KEDA scaledownPeriod)")
    s.add_argument("--pod-start", type=float, default=20.0, help="seconds to schedule and start a pod (stated)")
    s.add_argument("--model-load", type=float, default=None, help="default: the measured engine start")
    s.add_argument("--warm-budget", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="check the invariants while running")
    p.add_argument("--quick", action="store_true", help="a small fleet for seconds; implies --strict")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.replicas, args.adapters, args.duration, args.day, args.shift_every = [3], 200, 900.0, 900.0, 180.0
        args.warmup, args.idle, args.down_window, args.night_rate, args.strict = 30.0, 60.0, 60.0, 0.02, True
    bad = set(args.policies) - set(ELASTIC_POLICIES)
    if bad:
        p.error(f"unknown policies {sorted(bad)}; choose from {', '.join(ELASTIC_POLICIES)}")
    if args.out is None:
        args.out = ROOT / "bench" / "results" / ("latest/fleet_sim_elastic" if args.quick else "fleet_sim/elastic")
    return args


def workload(args, n: int) -> FleetWorkload:
    return FleetWorkload(num_adapters=args.adapters, zipf_s=args.zipf, rate=args.rate_per_replica * n,
                         duration_s=args.duration, burst_factor=args.burst_factor, burst_share=args.burst_share,
                         burst_mean_s=args.burst_mean, seed=args.seed, shift_every_s=args.shift_every,
                         shift_top=args.shift_top, shift_prob=args.shift_prob, diurnal_period_s=args.day,
                         night_share=args.night_share, night_rate=args.night_rate)


def rules(args, n: int, fleet: str, placement: str, model_load: float) -> tuple[ScaleRule, PlacementRule]:
    top = n if fleet == "fixed" else max(1, round(args.max_factor * n))
    scale = ScaleRule(mode=fleet, replicas=top, min_replicas=args.min_replicas, metric=args.hpa_metric,
                      target=args.hpa_target, down_window_s=args.down_window, interval_s=args.scale_interval,
                      idle_s=args.idle, pod_start_s=args.pod_start, model_load_s=model_load,
                      warm_budget_s=args.warm_budget)
    prule = PlacementRule(mode=placement, replicas=args.fixed_replicas, min=args.auto_min,
                          max=args.auto_max or None, target_rps=args.target_rps, window_s=args.window,
                          cooldown_s=args.cooldown, interval_s=args.placement_interval)
    return scale, prule


def verdict(runs: list[dict]) -> dict:
    """The goal at the largest fleet: the best TTFT p99 among runs with GPU-hours <= the baseline's."""
    n = max(r["replicas"] for r in runs)
    rows = [r for r in runs if r["replicas"] == n]
    base = next((r for r in rows if (r["fleet"], r["placement"], r["policy"]) == BASELINE), None)
    if base is None:
        return {"replicas": n, "met": None, "why": "the baseline (fixed fleet, fixed placement, random) was not run"}
    b = base["metrics"]
    ok = [r for r in rows if r["metrics"]["gpu_hours"] <= b["gpu_hours"] * (1 + 1e-9)]
    best = min(ok, key=lambda r: r["metrics"]["ttft_p99_s"])
    m = best["metrics"]
    ratio = b["ttft_p99_s"] / m["ttft_p99_s"]
    return {"replicas": n, "baseline": {k: b[k] for k in ("ttft_p50_s", "ttft_p99_s", "gpu_hours")},
            "best": {"fleet": best["fleet"], "placement": best["placement"], "policy": best["policy"],
                     **{k: m[k] for k in ("ttft_p50_s", "ttft_p99_s", "gpu_hours")}},
            "p99_ratio": ratio, "gpu_hours_ratio": m["gpu_hours"] / b["gpu_hours"], "goal_ratio": GOAL_RATIO,
            "met": bool(ratio >= GOAL_RATIO)}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    costs = cost_model.load(args.costs)
    if args.disk_load_scale != 1.0:
        costs = costs.with_disk_loads_scaled(args.disk_load_scale)
    model_load = args.model_load if args.model_load is not None else costs.fit.get("engine_start_s") or 2.0
    rcfg = ReplicaConfig(device_slots=args.device_slots, host_slots=args.host_slots, max_num_seqs=args.max_num_seqs,
                         adapter_fairness_s=args.adapter_fairness_seconds, fifo_loads=args.fifo_loads)
    t0 = time.perf_counter()
    runs, summaries = [], {}
    for n in args.replicas:
        spec = workload(args, n)
        trace = generate(spec)
        summaries[n] = summary(trace, spec)
        for fleet in args.fleets:
            for placement in args.placements:
                for name in args.policies:
                    scale, prule = rules(args, n, fleet, placement, model_load)
                    m, sim = simulate_elastic(spec, trace, rcfg, scale, prule, make_policy(name, n, args.seed), costs,
                                              seed=args.seed, strict=args.strict, warmup_s=args.warmup)
                    runs.append({"replicas": n, "fleet": fleet, "placement": placement, "policy": name,
                                 "metrics": m, "pods": timeline(sim)})
                    log.info("%3d %-5s %-5s %-12s p50 %6.2fs p99 %6.2fs cold %6.1f/min GPU-h %6.2f pods %5.1f "
                             "(peak %d, %d started, %d from zero) (%.0fs)", n, fleet, placement, name, m["ttft_p50_s"],
                             m["ttft_p99_s"], m["cold_loads_per_min"], m["gpu_hours"], m["mean_pods"], m["peak_pods"],
                             m["pods_created"], m["scale_from_zero"], m["sim_wall_s"])
    scale, _ = rules(args, max(args.replicas), "zero", "auto", model_load)
    result = {
        "meta": {"command": " ".join(["python -m bench.fleet_sim.elastic", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
                 "seed": args.seed, "wall_s": time.perf_counter() - t0, "rate_per_replica": args.rate_per_replica,
                 "warmup_s": args.warmup, "replica": rcfg.__dict__, "quick": args.quick, "strict": args.strict,
                 "disk_load_scale": args.disk_load_scale, "cold_start_s": scale.cold_start_s,
                 "pod_start_s": args.pod_start, "model_load_s": model_load, "max_factor": args.max_factor,
                 "scale": {k: v for k, v in scale.__dict__.items() if k not in ("mode", "replicas")},
                 "placement_fixed": rules(args, 4, "fixed", "fixed", model_load)[1].describe(),
                 "placement_auto": rules(args, 4, "fixed", "auto", model_load)[1].describe()},
        "workload": workload(args, 1).describe() | {"rate": "rate_per_replica x n"},
        "workload_summary": summaries,
        "fit": costs.coefficients() | {k: v for k, v in costs.fit.items()},
        "runs": runs,
        "goal": verdict(runs),
    }
    elastic_report.write(result, args.out)
    log.info("results in %s", args.out)
    log.info("goal: %s", json.dumps(result["goal"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
