"""Write the elastic sweep's results: results.json, results.md and two PNGs (TTFT p99 against
GPU-hours per fleet size; pods over the day at the largest size)."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [  # key, title, format
    ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
    ("cold_loads_per_min", "cold loads/min", "{:.0f}"),
    ("gpu_hours", "GPU-hours", "{:.2f}"),
    ("mean_pods", "mean pods", "{:.1f}"),
    ("peak_pods", "peak pods", "{:d}"),
    ("pods_created", "cold starts", "{:d}"),
    ("held_max_s", "max held s", "{:.1f}"),
    ("warm_hit_rate", "warm-hit", "{:.1%}"),
    ("throughput_tok_s", "out tok/s", "{:.0f}"),
]
FLEETS = {"fixed": "fixed n", "hpa": "autoscaled", "zero": "autoscaled + to zero"}


def _fmt(fmt: str, v) -> str:
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def goal_lines(goal: dict) -> list[str]:
    if goal.get("met") is None:
        return [f"- Not evaluated: {goal.get('why')}"]
    b, best = goal["baseline"], goal["best"]
    word = "**met**" if goal["met"] else "**not met**"
    return [
        f"- At {goal['replicas']} replicas the baseline (fixed fleet, fixed placement, random routing) has TTFT p99 "
        f"{b['ttft_p99_s']:.2f} s (p50 {b['ttft_p50_s']:.2f} s) for {b['gpu_hours']:.1f} GPU-hours.",
        f"- The lowest TTFT p99 at equal or fewer GPU-hours: {FLEETS[best['fleet']]}, {best['placement']} placement, "
        f"`{best['policy']}`: {best['ttft_p99_s']:.2f} s (p50 {best['ttft_p50_s']:.2f} s) for {best['gpu_hours']:.1f} "
        f"GPU-hours ({goal['gpu_hours_ratio']:.0%} of the baseline's).",
        f"- {goal['p99_ratio']:.1f}x lower TTFT p99 against a goal of {goal['goal_ratio']:.0f}x: {word}.",
    ]


def markdown(result: dict) -> str:
    meta, fit, wl = result["meta"], result["fit"], result["workload"]
    sc = meta["scale"]
    lines = [
        "# loraplex elastic fleet simulation",
        "",
        f"- Command: `{meta['command']}`; seed {meta['seed']}; simulated in {meta['wall_s']:.0f} s of wall time.",
        f"- Workload: {wl['num_adapters']} adapters, Zipf s = {wl['zipf_s']}, the ranking shifting every "
        f"{wl['shift_every_s']:.0f} s (each of the {wl['shift_top']} hottest ranks swaps with a random colder adapter "
        f"with probability {wl['shift_prob']}); a compressed day of {wl['diurnal_period_s']:.0f} s: a half-sine day, "
        f"then a quiet night ({wl['night_share']:.0%} of it, {wl['night_rate']} req/s); "
        f"{meta['rate_per_replica']} req/s per replica of n on average over the day; MMPP bursts of "
        f"{wl['burst_factor']}x, {wl['burst_share']:.0%} of the time; {wl['duration_s']:.0f} s simulated, the first "
        f"{meta['warmup_s']:.0f} s not measured; prompts {wl['input_range'][0]}-{wl['input_range'][1]} tokens, outputs "
        f"{wl['output_range'][0]}-{wl['output_range'][1]}.",
        f"- Replica: {meta['replica']['device_slots']} device slots, {meta['replica']['host_slots']} host slots, max "
        f"{meta['replica']['max_num_seqs']} sequences, slot-fairness {meta['replica']['adapter_fairness_s']} s, "
        f"{'one FIFO load queue' if meta['replica'].get('fifo_loads', True) else 'request loads ahead of prefetches'}. Step = "
        f"{fit['c0_s'] * 1e3:.1f} ms + {fit['c_row_s'] * 1e3:.2f} ms/row + {fit['c_token_s'] * 1e3:.3f} ms/prefill token "
        f"+ {fit['c_adapter_s'] * 1e3:.2f} ms/distinct adapter (R² {fit['r2']:.3f}); disk -> host load median "
        f"{fit['disk_load_median_s'] * 1e3:.0f} ms" + (f" x{meta['disk_load_scale']:g}" if meta['disk_load_scale'] != 1 else "")
        + f"; engine measured at {fit['meta'].get('git', '?')}.",
        f"- Placement: {meta['placement_fixed']}; {meta['placement_auto']}.",
        f"- Fleets: `fixed n` = n pods all day; `autoscaled` = the operator's autoscaler ({sc['metric']}, target "
        f"{sc['target']:g}, scale-down window {sc['down_window_s']:.0f} s, every {sc['interval_s']:.0f} s) between "
        f"{sc['min_replicas']} and {meta['max_factor']:g} x n pods; `+ to zero` = to 0 pods after {sc['idle_s']:.0f} s "
        f"idle. A new pod starts in {meta['cold_start_s']:.1f} s ({meta['pod_start_s']:.0f} s pod start, stated, + "
        f"{meta['model_load_s']:.1f} s engine start, measured), then loads its placed adapters hottest first (at most "
        f"{sc['warm_budget_s']:.0f} s) before it is Ready.",
        "- GPU-hours: pods that exist (starting, warming, serving, draining), integrated over the measured window. "
        "Cold loads: disk -> host adapter loads, all pods, prefetches and warm-ups included. Max held: the longest a "
        "request waited at the gateway for a pod (scale from zero).",
        "",
        "## The goal", "",
    ] + goal_lines(result["goal"]) + [""]
    for n in sorted({r["replicas"] for r in result["runs"]}):
        rows = [r for r in result["runs"] if r["replicas"] == n]
        ws = result["workload_summary"].get(str(n)) or result["workload_summary"].get(n) or {}
        lines += [f"## {n} replicas ({ws.get('requests', '?')} requests, peak minute {ws.get('peak_minute_rate', 0):.1f} "
                  f"req/s)", "",
                  "| fleet | placement | policy | " + " | ".join(t for _, t, _ in COLUMNS) + " |",
                  "|---|---|---|" + "---:|" * len(COLUMNS)]
        for r in sorted(rows, key=lambda r: r["metrics"]["ttft_p99_s"]):
            m = r["metrics"]
            lines.append(f"| {FLEETS[r['fleet']]} | {r['placement']} | {r['policy']} | "
                         + " | ".join(_fmt(f, m[k]) for k, _, f in COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    sizes = sorted({r["replicas"] for r in runs})
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    markers = {("fixed", "fixed"): "o", ("fixed", "auto"): "s", ("hpa", "fixed"): "^", ("hpa", "auto"): "v",
               ("zero", "fixed"): "<", ("zero", "auto"): ">"}
    colors = {p: f"C{i}" for i, p in enumerate(policies)}
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.5), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for r in (r for r in runs if r["replicas"] == n):
            m = r["metrics"]
            ax.scatter(m["gpu_hours"], m["ttft_p99_s"], color=colors[r["policy"]],
                       marker=markers.get((r["fleet"], r["placement"]), "x"), s=36)
        ax.set_yscale("log")
        ax.set_xlabel("GPU-hours")
        ax.set_ylabel("TTFT p99 (s)")
        ax.set_title(f"{n} replicas")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=p) for p, c in colors.items()]
    handles += [plt.Line2D([], [], color="k", marker=mk, ls="", label=f"{FLEETS[f]}, {pl}")
                for (f, pl), mk in markers.items()]
    axes[0][0].legend(handles=handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "p99_vs_gpu_hours.png", dpi=90)
    plt.close(fig)

    n = sizes[-1]
    fig, ax = plt.subplots(figsize=(9, 4))
    for fleet in ("hpa", "zero"):
        r = next((r for r in runs if r["replicas"] == n and r["fleet"] == fleet and r["placement"] == "auto"
                  and r["policy"] == result["goal"].get("best", {}).get("policy", policies[0])), None)
        if r:
            t, exist, _ = zip(*r["pods"])
            ax.step([x / 60 for x in t], exist, where="post", label=f"{FLEETS[fleet]} ({r['policy']}, auto)")
    ax.axhline(n, color="k", lw=1, ls="--", label=f"fixed n = {n}")
    ax.set_xlabel("minutes")
    ax.set_ylabel("pods")
    ax.set_title(f"Pods over the compressed day, {n} replicas")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pods_over_day.png", dpi=90)
    plt.close(fig)
    return ["p99_vs_gpu_hours.png", "pods_over_day.png"]


def dumps(result: dict) -> str:
    """Indented JSON, but each run's pod timeline on one line (one number per line would triple it)."""
    timelines = {}
    runs = []
    for i, r in enumerate(result["runs"]):
        r = dict(r)
        if "pods" in r:
            timelines[f"@pods{i}@"] = json.dumps(r["pods"], separators=(",", ":"))
            r["pods"] = f"@pods{i}@"
        runs.append(r)
    text = json.dumps({**result, "runs": runs}, indent=1, sort_keys=True, default=float)
    for token, compact in timelines.items():
        text = text.replace(f'"{token}"', compact)
    return text + "\n"


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(result, out)
    (out / "results.json").write_text(dumps(result))
    (out / "results.md").write_text(markdown(result))
