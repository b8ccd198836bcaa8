"""Write the rollout scenario's results: results.json (every run, and means over seeds) and results.md."""
from __future__ import annotations

import json
from pathlib import Path

MB = 1 << 20
MODES = {  # mode -> how the table names it
    "none": "no rollout (control)",
    "in-place": "replace in place",
    "warm": "warm before shift",
    "warm-resident": "warm where resident",
    "canary": "warm + canary 10/50/100",
}
COLUMNS = [  # key, title, format; means over seeds
    ("ttft_rollout_p50_s", "TTFT p50 rollout s", "{:.2f}"),
    ("ttft_rollout_p99_s", "TTFT p99 rollout s", "{:.2f}"),
    ("ttft_p50_s", "TTFT p50 all s", "{:.2f}"),
    ("ttft_p99_s", "TTFT p99 all s", "{:.2f}"),
    ("first_was_warm_ttft_mean_s", "1st req. on a warm pod: TTFT mean s", "{:.2f}"),
    ("first_was_warm_ttft_p99_s", "... p99 s", "{:.2f}"),
    ("first_cold_was_warm", "cold though warm", "{:.0f}"),
    ("first_cold_was_warm_vs_none", "... vs control", "{:+.0f}"),
    ("request_loads_rollout_vs_none", "request-path loads vs control", "{:+.0f}"),
    ("request_loads_new_placed", "new-rev. request loads, placed pods", "{:.0f}"),
    ("prefetch_loads_rollout", "prefetch loads", "{:.0f}"),
    ("shift_delay_p50_s", "warm-up to shift p50 s", "{:.1f}"),
    ("overlap_peak_mb", "overlap peak MB (fleet)", "{:.0f}"),
    ("overlap_peak_pod_mb", "overlap peak MB (pod)", "{:.0f}"),
]


def _fmt(fmt: str, v) -> str:
    try:
        return "–" if v != v else fmt.format(v)  # NaN: the metric does not apply
    except (TypeError, ValueError):
        return str(v)


def _row(agg: dict) -> dict:
    m = dict(agg["mean"])
    m["overlap_peak_mb"] = m["overlap_peak_bytes"] / MB
    m["overlap_peak_pod_mb"] = m["overlap_peak_pod_bytes"] / MB
    return m


def findings(result: dict) -> list[str]:
    """One line per scenario and policy: what replace-in-place costs against warm before shift."""
    lines = []
    by = {(a["scenario"], a["policy"], a["mode"]): _row(a) for a in result["aggregate"]}
    for scenario, policy in dict.fromkeys((a["scenario"], a["policy"]) for a in result["aggregate"]):
        get = lambda mode: by.get((scenario, policy, mode))  # noqa: E731
        ctl, inplace, warm = get("none"), get("in-place"), get("warm")
        if not (ctl and inplace and warm):
            continue
        text = (f"{scenario}, `{policy}`: replace in place makes {inplace['first_cold_was_warm_vs_none']:+.0f} cold "
                f"first requests on pods where the adapter was warm (against the control), warm before shift "
                f"{warm['first_cold_was_warm_vs_none']:+.0f}")
        for mode in ("warm-resident", "canary"):
            if get(mode):
                text += f", {MODES[mode]} {get(mode)['first_cold_was_warm_vs_none']:+.0f}"
        text += (f"; that first request's mean TTFT is {inplace['first_was_warm_ttft_mean_s']:.2f} s in place, "
                 f"{warm['first_was_warm_ttft_mean_s']:.2f} s warm, {ctl['first_was_warm_ttft_mean_s']:.2f} s without "
                 f"a rollout; warm before shift adds {warm['prefetch_loads_rollout']:.0f} prefetch loads and holds at "
                 f"most {warm['overlap_peak_mb']:.0f} MB of second copies fleet-wide.")
        lines.append(text)
    return lines


def markdown(result: dict) -> str:
    meta, fit, wl = result["meta"], result["fit"], result["workload"]
    lo, hi = meta["window_longest_s"]
    lines = [
        "# loraplex fleet simulation: rolling out adapter revisions",
        "",
        f"- Command: `{meta['command']}`; seeds {', '.join(map(str, meta['seeds']))} (tables: means over seeds); "
        f"simulated in {meta['wall_s']:.0f} s of wall time.",
        f"- Fleet: {meta['replicas']} replicas, each {meta['replica']['device_slots']} device slots, "
        f"{meta['replica']['host_slots']} host slots, max {meta['replica']['max_num_seqs']} sequences, "
        f"{meta['replica']['loader_workers']} loader threads, "
        + ("one FIFO load queue (a what-if: the engine before request loads went first)"
           if meta['replica'].get('fifo_loads') else "request loads ahead of prefetches (the engine's)")
        + f"; placement {meta['placement']}.",
        f"- Workload: {wl['num_adapters']} adapters, Zipf s = {wl['zipf_s']}; MMPP bursts of {wl['burst_factor']}x, "
        f"{wl['burst_share']:.0%} of the time; {meta['rate_per_replica']} req/s per replica; {wl['duration_s']:.0f} s, "
        f"the first {meta['warmup_s']:.0f} s not measured; {meta['sessions']} sessions (OpenAI `user`) per adapter.",
        f"- Rollout: {meta['rollout_adapters']} adapters get revision 2 at uniform random times from "
        f"{meta['start_s']:.0f} s over the spread; the rollout window is [{meta['start_s']:.0f} s, start + spread + "
        f"{len(meta['steps'])} x {meta['step_s']:.0f} s) ([{lo:.0f}, {hi:.0f}) s for the longest spread), the same "
        f"for every mode; the operator's pass while a revision warms every {meta['check_s']:.0f} s; canary steps "
        f"{'/'.join(f'{s:g}' for s in meta['steps'])} % every {meta['step_s']:.0f} s; one revision's weights: "
        f"{meta['adapter_bytes'] / MB:.1f} MB (the measured rank-8 adapter).",
        f"- Step = {fit['c0_s'] * 1e3:.1f} ms + {fit['c_row_s'] * 1e3:.2f} ms/row + {fit['c_token_s'] * 1e3:.3f} "
        f"ms/prefill token + {fit['c_adapter_s'] * 1e3:.2f} ms/distinct adapter; disk -> host load median "
        f"{fit['disk_load_median_s'] * 1e3:.0f} ms measured (scaled per scenario), host -> device "
        f"{fit['h2d_median_s'] * 1e3:.0f} ms.",
        "- *Cold though warm*: first requests, per (pod, adapter) after the adapter's revision time, whose "
        "chosen weights were not resident although the adapter was resident on that pod at that time; the control "
        "counts the same pairs, so *vs control* is what the rollout itself causes. *Overlap*: adapters with both "
        "revisions in host RAM or a slot of one pod (sampled every second) x the adapter's bytes; under the "
        "engine's count cap these copies displace other adapters rather than grow RAM.",
        "",
    ]
    if result.get("findings"):
        lines += ["## Findings", ""] + [f"- {s}" for s in result["findings"]] + [""]
    for scenario in dict.fromkeys(a["scenario"] for a in result["aggregate"]):
        rows = [a for a in result["aggregate"] if a["scenario"] == scenario]
        lines += [f"## {scenario}", "",
                  "| policy | mode | " + " | ".join(t for _, t, _ in COLUMNS) + " |",
                  "|---|---|" + "---:|" * len(COLUMNS)]
        for a in rows:
            m = _row(a)
            lines.append(f"| {a['policy']} | {MODES.get(a['mode'], a['mode'])} | "
                         + " | ".join(_fmt(f, m.get(k, float("nan"))) for k, _, f in COLUMNS) + " |")
        lines.append("")
    return "\n".join(lines)


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["findings"] = findings(result)
    (out / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=float) + "\n")
    (out / "results.md").write_text(markdown(result))
