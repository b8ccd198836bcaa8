"""`python -m bench.fleet_sim.rollout`: roll a new revision of every adapter out across a fleet.

    python -m bench.fleet_sim.rollout [--out bench/results/fleet_sim/rollout]
    python -m bench.fleet_sim.rollout --quick      # seconds: a small fleet, invariants checked

For each scenario (disk -> host load speed x how fast the revisions arrive), routing policy,
rollout mode (revisions.py: none, in-place, warm, warm-resident, canary) and seed, it simulates
the same trace and reports the cold loads the rollout causes, TTFT during the rollout window and
overall, and the host RAM the two-revision overlap takes. See bench/README.md ("Rollouts: warm
before shift").
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from bench.fleet_sim import cost as cost_model
from bench.fleet_sim import rollout_report
from bench.fleet_sim.placement import PlacementRule
from bench.fleet_sim.policies import ELASTIC_POLICIES, make_policy
from bench.fleet_sim.replica import ReplicaConfig
from bench.fleet_sim.revisions import MODES, RolloutRule, simulate_rollout
from bench.fleet_sim.workload import FleetWorkload, generate, summary

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("bench.fleet_sim")
# metrics compared against the `none` run of the same scenario, policy and seed
AGAINST_NONE = ("first_cold_was_warm", "disk_loads_rollout", "request_loads_rollout")


def _nums(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sim.rollout", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--replicas", type=int, default=16)
    p.add_argument("--policies", type=_names, default=["placed", "gie"])
    p.add_argument("--modes", type=_names, default=list(MODES))
    p.add_argument("--seeds", type=_nums(int), default=[0, 1, 2])
    w = p.add_argument_group("workload")
    w.add_argument("--adapters", type=int, default=1000)
    w.add_argument("--zipf", type=float, default=1.0)
    w.add_argument("--rate-per-replica", type=float, default=0.5)
    w.add_argument("--duration", type=float, default=900.0)
    w.add_argument("--warmup", type=float, default=60.0)
    w.add_argument("--burst-factor", type=float, default=3.0)
    w.add_argument("--burst-share", type=float, default=0.2)
    r = p.add_argument_group("rollout")
    r.add_argument("--rollout-adapters", type=int, default=None, help="adapters that get a revision (default: all)")
    r.add_argument("--start", type=float, default=300.0, help="when the first revision appears")
    r.add_argument("--spreads", type=_nums(float), default=[300.0],
                   help="seconds over which the revisions appear, one scenario each (0: all at once)")
    r.add_argument("--steps", type=_nums(float), default=[10.0, 50.0, 100.0], help="canary percents")
    r.add_argument("--step-seconds", type=float, default=60.0)
    r.add_argument("--check-interval", type=float, default=5.0, help="the operator's pass while a revision warms")
    r.add_argument("--sessions", type=int, default=50, help="sessions (OpenAI user) per adapter")
    f = p.add_argument_group("fleet")
    f.add_argument("--placement", choices=("fixed", "auto"), default="fixed")
    f.add_argument("--fixed-replicas", type=int, default=2, help="pods per adapter (the operator's default)")
    f.add_argument("--device-slots", type=int, default=8)
    f.add_argument("--host-slots", type=int, default=64)
    f.add_argument("--max-num-seqs", type=int, default=32)
    f.add_argument("--disk-load-scales", type=_nums(float), default=[1.0, 25.0],
                   help="disk -> host load time multipliers, one scenario each (25: ~1 s, an object store)")
    f.add_argument("--fifo-loads", action="store_true",
                   help="what-if: one FIFO load queue, prefetches and request loads alike (the engine before "
                        "request loads went first)")
    f.add_argument("--costs", type=Path, default=cost_model.DEFAULT_DATA)
    p.add_argument("--strict", action="store_true", help="check the invariants while running")
    p.add_argument("--quick", action="store_true", help="a small fleet for seconds; implies --strict")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.replicas, args.adapters, args.duration, args.warmup, args.start = 4, 100, 300.0, 30.0, 100.0
        args.spreads, args.step_seconds, args.seeds, args.policies = [60.0], 20.0, [0], ["placed"]
        args.disk_load_scales, args.strict = [1.0, 25.0], True
    bad = (set(args.policies) - set(ELASTIC_POLICIES)) | (set(args.modes) - set(MODES))
    if bad:
        p.error(f"unknown policies or modes {sorted(bad)}")
    if args.out is None:
        args.out = ROOT / "bench" / "results" / ("latest/fleet_sim_rollout" if args.quick else "fleet_sim/rollout")
    return args


def relative_to_none(runs: list[dict]) -> None:
    """Each run's `<metric>_vs_none`: its value minus the `none` run's, same scenario/policy/seed."""
    base = {(r["scenario"], r["policy"], r["seed"]): r["metrics"] for r in runs if r["mode"] == "none"}
    for r in runs:
        b = base.get((r["scenario"], r["policy"], r["seed"]))
        for k in AGAINST_NONE:
            r["metrics"][f"{k}_vs_none"] = r["metrics"][k] - b[k] if b else float("nan")


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean over seeds per (scenario, policy, mode), with each metric's min and max."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["policy"], r["mode"]), []).append(r["metrics"])
    out = []
    for (scenario, policy, mode), ms in groups.items():
        keys = [k for k, v in ms[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        mean = {k: float(np.nanmean([m[k] for m in ms])) if any(np.isfinite(m[k]) for m in ms) else float("nan")
                for k in keys}
        spread = {k: [float(np.nanmin([m[k] for m in ms])), float(np.nanmax([m[k] for m in ms]))]
                  for k in keys if any(np.isfinite(m[k]) for m in ms)}
        out.append({"scenario": scenario, "policy": policy, "mode": mode, "seeds": len(ms), "mean": mean,
                    "range": spread})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base_costs = cost_model.load(args.costs)
    rcfg = ReplicaConfig(device_slots=args.device_slots, host_slots=args.host_slots, max_num_seqs=args.max_num_seqs,
                         fifo_loads=args.fifo_loads)
    prule = PlacementRule(mode=args.placement, replicas=args.fixed_replicas, min=args.fixed_replicas)
    adapter_bytes = int(base_costs.fit["meta"].get("adapter_bytes", RolloutRule.adapter_bytes))
    t0 = time.perf_counter()
    runs, summaries = [], {}
    for seed in args.seeds:
        spec = FleetWorkload(num_adapters=args.adapters, zipf_s=args.zipf, rate=args.rate_per_replica * args.replicas,
                             duration_s=args.duration, burst_factor=args.burst_factor, burst_share=args.burst_share,
                             seed=seed)
        trace = generate(spec)
        summaries[seed] = summary(trace, spec)
        for scale in args.disk_load_scales:
            costs = base_costs.with_disk_loads_scaled(scale) if scale != 1.0 else base_costs
            for spread in args.spreads:
                scenario = f"disk x{scale:g}, spread {spread:g} s"
                for policy in args.policies:
                    for mode in args.modes:
                        rule = RolloutRule(mode=mode, start_s=args.start, spread_s=spread,
                                           adapters=args.rollout_adapters, steps=tuple(args.steps),
                                           step_s=args.step_seconds, check_s=args.check_interval,
                                           sessions=args.sessions, adapter_bytes=adapter_bytes)
                        m, _ = simulate_rollout(spec, trace, rcfg, args.replicas, prule,
                                                make_policy(policy, args.replicas, seed), costs, rule, seed=seed,
                                                strict=args.strict, warmup_s=args.warmup)
                        m.pop("config", None)
                        runs.append({"scenario": scenario, "disk_load_scale": scale, "spread_s": spread,
                                     "policy": policy, "mode": mode, "seed": seed, "metrics": m})
                        log.info("seed %d %-22s %-7s %-13s TTFT rollout p50 %.2fs p99 %.2fs  cold-though-warm %4d "
                                 "request loads %4d prefetch %4d overlap peak %3d (%.1fs)", seed, scenario, policy,
                                 mode, m["ttft_rollout_p50_s"], m["ttft_rollout_p99_s"], m["first_cold_was_warm"],
                                 m["request_loads_rollout"], m["prefetch_loads_rollout"], m["overlap_peak_adapters"],
                                 m["sim_wall_s"])
    relative_to_none(runs)
    lo, hi = RolloutRule(start_s=args.start, spread_s=max(args.spreads), steps=tuple(args.steps),
                         step_s=args.step_seconds).window
    result = {
        "meta": {"command": " ".join(["python -m bench.fleet_sim.rollout",
                                      shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
                 "seeds": args.seeds, "wall_s": time.perf_counter() - t0, "replicas": args.replicas,
                 "rate_per_replica": args.rate_per_replica, "warmup_s": args.warmup, "replica": rcfg.__dict__,
                 "placement": prule.describe(), "quick": args.quick, "strict": args.strict,
                 "adapter_bytes": adapter_bytes, "start_s": args.start, "spreads_s": args.spreads,
                 "steps": args.steps, "step_s": args.step_seconds, "check_s": args.check_interval,
                 "sessions": args.sessions, "rollout_adapters": args.rollout_adapters or args.adapters,
                 "window_longest_s": [lo, hi], "disk_load_scales": args.disk_load_scales},
        "workload": spec.describe() | {"rate": "rate_per_replica x replicas", "seed": "per run"},
        "workload_summary": summaries,
        "fit": base_costs.coefficients() | {k: v for k, v in base_costs.fit.items()},
        "aggregate": aggregate(runs),
        "runs": runs,
    }
    rollout_report.write(result, args.out)
    log.info("results in %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
