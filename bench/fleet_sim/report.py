"""Write the simulator's results: results.json, results.md and the PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

METRICS = [  # key, column title, format
    ("throughput_req_s", "req/s", "{:.2f}"),
    ("throughput_tok_s", "out tok/s", "{:.0f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.2f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.2f}"),
    ("cold_loads_per_s", "cold loads/s", "{:.2f}"),
    ("device_loads_per_s", "slot loads/s", "{:.2f}"),
    ("warm_hit_rate", "warm-hit", "{:.1%}"),
    ("replica_load_max_over_mean", "max/mean replica load", "{:.2f}"),
]


def _fmt(fmt: str, v) -> str:
    try:
        return fmt.format(v)
    except (TypeError, ValueError):
        return str(v)


def markdown(result: dict) -> str:
    meta, fit, wl = result["meta"], result["fit"], result["workload"]
    lines = [
        "# loraplex fleet simulation",
        "",
        f"- Command: `{meta['command']}`; seed {meta['seed']}; simulated in {meta['wall_s']:.0f} s of wall time.",
        f"- Workload: {wl['num_adapters']} adapters, Zipf s = {wl['zipf_s']}; MMPP-2 arrivals (bursts of "
        f"{wl['burst_factor']}x the mean rate, {wl['burst_share']:.0%} of the time, {wl['burst_mean_s']} s on average); "
        f"{meta['rate_per_replica']} req/s per replica on average; {wl['duration_s']:.0f} s, the first "
        f"{meta['warmup_s']:.0f} s not measured; prompts {wl['input_range'][0]}-{wl['input_range'][1]} tokens, "
        f"outputs {wl['output_range'][0]}-{wl['output_range'][1]}.",
        f"- Replica: {meta['replica']['device_slots']} device slots, {meta['replica']['host_slots']} host slots, "
        f"max {meta['replica']['max_num_seqs']} sequences, {meta['replica']['loader_workers']} loader threads; "
        f"the router's view of engine state is refreshed every {meta['scrape_interval_s']} s.",
        f"- Step cost fitted to {fit['samples']} measured engine steps ({fit['meta'].get('model', '?')}, "
        f"1 torch thread): step = {fit['c0_s'] * 1e3:.1f} ms + {fit['c_row_s'] * 1e3:.2f} ms/row + "
        f"{fit['c_token_s'] * 1e3:.3f} ms/prefill token + {fit['c_adapter_s'] * 1e3:.2f} ms/distinct adapter; "
        f"R² {fit['r2']:.3f}, median relative error {fit['median_rel_error']:.1%} (p90 {fit['p90_rel_error']:.1%}). "
        f"Disk -> host load median {fit['disk_load_median_s'] * 1e3:.0f} ms"
        + (f" measured, scaled x{meta['disk_load_scale']:g} here" if meta.get("disk_load_scale", 1.0) != 1.0 else "")
        + f", host -> device copy median {fit['h2d_median_s'] * 1e3:.1f} ms.",
        "",
    ]
    for n in sorted({r["replicas"] for r in result["runs"]}):
        rows = [r for r in result["runs"] if r["replicas"] == n]
        lines += [f"## {n} replicas ({rows[0]['metrics']['requests_in_window']} requests measured)", "",
                  "| policy | " + " | ".join(t for _, t, _ in METRICS) + " |",
                  "|---|" + "---:|" * len(METRICS)]
        for r in rows:
            m = r["metrics"]
            lines.append(f"| {r['policy']} | " + " | ".join(_fmt(f, m[k]) for k, _, f in METRICS) + " |")
        lines.append("")
    if result.get("summary"):
        lines += ["## Which policy wins", ""] + [f"- {s}" for s in result["summary"]] + [""]
    return "\n".join(lines)


def plot(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    runs = result["runs"]
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    reps = sorted({r["replicas"] for r in runs})
    keys = [("throughput_tok_s", "output tokens/s"), ("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p99_s", "TTFT p99 (s)"),
            ("cold_loads_per_s", "cold (disk) loads/s"), ("warm_hit_rate", "warm-hit rate"),
            ("replica_load_max_over_mean", "max/mean replica load")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for ax, (k, title) in zip(axes.flat, keys):
        for p in policies:
            ys = [next((r["metrics"][k] for r in runs if r["policy"] == p and r["replicas"] == n), float("nan")) for n in reps]
            ax.plot(reps, ys, marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_xticks(reps, [str(n) for n in reps])
        ax.set_xlabel("replicas")
        ax.set_title(title)
        if k.startswith("ttft"):
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(f"Fleet simulation: {result['workload']['num_adapters']} adapters, Zipf s={result['workload']['zipf_s']}, "
                 f"{result['meta']['rate_per_replica']} req/s per replica")
    fig.tight_layout()
    fig.savefig(out / "policies_vs_replicas.png", dpi=90)
    plt.close(fig)
    names.append("policies_vs_replicas.png")

    samples = result.get("fit_samples")
    if samples:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.scatter([s[0] * 1e3 for s in samples], [s[1] * 1e3 for s in samples], s=6, alpha=0.5)
        hi = max(max(s) for s in samples) * 1e3
        ax.plot([0, hi], [0, hi], color="k", lw=1)
        ax.set_xlabel("measured step (ms)")
        ax.set_ylabel("fitted step (ms)")
        ax.set_title(f"Step-cost fit: R² {result['fit']['r2']:.3f}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "step_cost_fit.png", dpi=90)
        plt.close(fig)
        names.append("step_cost_fit.png")
    return names


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot(result, out)
    samples = result.pop("fit_samples", None)
    (out / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=float) + "\n")
    (out / "results.md").write_text(markdown(result))
    if samples is not None:
        result["fit_samples"] = samples
