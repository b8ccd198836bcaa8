"""Metrics from replay records, and the JSON / Markdown / PNG outputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from bench.systems import RunResult


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_metrics(run: RunResult, slo_ttft: float) -> dict:
    recs = run.records
    ok = [r for r in recs if r.error is None and r.finish is not None and r.first_token is not None]
    ttft = [r.first_token - r.arrival for r in ok]
    e2e = [r.finish - r.arrival for r in ok]
    tpot = [(r.finish - r.first_token) / (r.tokens - 1) for r in ok if r.tokens > 1]
    end = max((r.finish for r in ok), default=0.0)
    start = min((r.arrival for r in recs), default=0.0)
    span = max(end - start, 1e-9)
    tokens = sum(r.tokens for r in ok)
    return {
        "system": run.system,
        "requests": len(recs),
        "completed": len(ok),
        "errors": len(recs) - len(ok),
        "short_outputs": sum(1 for r in ok if r.tokens != r.output_len),
        "duration_s": span,
        "throughput_req_s": len(ok) / span,
        "throughput_tok_s": tokens / span,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_mean_s": float(np.mean(tpot)) if tpot else None,
        "tpot_p50_s": percentile(tpot, 50),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
        "slo_ttft_s": slo_ttft,
        # every request counts: a failed one misses the SLO
        "slo_attainment": sum(1 for t in ttft if t <= slo_ttft) / max(1, len(recs)),
        "ttft_s": [round(t, 4) for t in ttft],
        "first_error": next((r.error for r in recs if r.error), None),
        **{f"x_{k}": v for k, v in run.extra.items()},
    }


def bytes_bound(base_bytes: float, distinct: float, adapter_bytes: float) -> float:
    """Best possible step-time ratio (base-only / with adapters) for a memory-bound decode step:
    each distinct adapter in the batch adds its A and B to the bytes read."""
    return base_bytes / (base_bytes + distinct * adapter_bytes)


# ---- Markdown ---------------------------------------------------------------------------------

def _f(v, fmt="{:.2f}", none="–"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return fmt.format(v)


def _ms(v):
    return _f(None if v is None else 1000 * v, "{:.0f}")


def _ratio(v, iqr=None) -> str:
    """A ratio with its interquartile range: 0.97 [0.96–0.98]."""
    return _f(v) + (f" [{iqr[0]:.2f}–{iqr[1]:.2f}]" if v is not None and iqr else "")


def _ms_iqr(v, iqr=None) -> str:
    return _f(v, "{:.1f}") + (f" [{iqr[0]:.1f}–{iqr[1]:.1f}]" if v is not None and iqr else "")


def _of_bound(ratio, iqr, bound) -> str:
    if ratio is None:
        return "–"
    return f"{ratio / bound:.2f}" + (f" [{iqr[0] / bound:.2f}–{iqr[1] / bound:.2f}]" if iqr else "")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def serving_rows(entries: list[dict]) -> list[list[str]]:
    rows = []
    for e in entries:
        m = e["metrics"]
        ratio = e.get("ratio_vs_base")
        bound = e.get("bound")
        rows.append([
            e["system"], str(e["num_adapters"]) if e["num_adapters"] else "0 (base)", _f(e["alpha"], "{:g}"),
            _f(m["throughput_req_s"]), _f(m["throughput_tok_s"], "{:.1f}"),
            _ms(m["ttft_p50_s"]), _ms(m["ttft_p90_s"]), _ms(m["ttft_p99_s"]), _ms(m["tpot_mean_s"]),
            _f(100 * m["slo_attainment"], "{:.0f}%"),
            _f(ratio) + (f" (bound {_f(bound)})" if bound is not None else ""),
            _f(m.get("x_mean_batch"), "{:.1f}"), _f(e.get("distinct_per_step"), "{:.1f}"),
            (f"{m['errors']} err" if m["errors"] else ""),
        ])
    return rows


SERVING_HEADERS = ["system", "adapters", "alpha", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms",
                   "TPOT ms", "SLO", "tok/s vs base (bound)", "mean batch", "adapters/step", "notes"]


def multi_step_lines(ms: dict, label: str) -> list[str]:
    """The multi-adapter decode-step table (bench.run and bench.stepbench)."""
    return [f"## Multi-adapter decode step (batch {ms['batch']}, {label})", "",
            "Decode step with d distinct adapters among the rows, against the same batch with none. The "
            "configurations compared live as cohorts of sequences in one engine and take one step each in "
            "turn; the ratio is the median over those cycles of (no-adapter step / this step), with its "
            "interquartile range in brackets. Step ms: median wall time [IQR]. CPU ratio: the same from "
            "the thread's CPU time, which leaves out time the OS gave to other processes (a cross-check "
            "on a shared machine). The bound is the bytes ratio base / (base + d × adapter).", "",
            _table(["system", "distinct adapters", "step ms [IQR]", "ratio vs no adapter [IQR]", "CPU ratio [IQR]",
                    "bound", "ratio / bound", "steps"],
                   [[r["system"], str(r["distinct"]), _ms_iqr(r["step_ms"], r.get("step_ms_iqr")),
                     _ratio(r.get("ratio"), r.get("ratio_iqr")), _ratio(r.get("cpu_ratio"), r.get("cpu_ratio_iqr")),
                     _f(r["bound"]),
                     _f(r["ratio"] / r["bound"] if r.get("ratio") and r.get("bound") else None, "{:.0%}"),
                     str(r.get("steps", "–"))]
                    for r in ms["rows"]]), ""]


def markdown(result: dict) -> str:
    meta = result["meta"]
    w = meta["workload"]
    lines = [
        "# loraplex benchmark", "",
        f"- Machine: {meta['machine']['cpu_model']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['memory_gb']:.0f} GB RAM, no GPU; torch {meta['torch']} with {meta['threads']} intra-op "
        f"thread(s) per process. Load average (1 min) before: {meta['load_before']}, after: {meta.get('load_after', '?')}.",
        f"- Model: **{meta['model']['label']}** ({meta['model']['num_params'] / 1e6:.1f} M params, "
        f"{meta['model']['source']}), fp32, CPU.",
        f"- Adapters: PEFT LoRA checkpoints (save_pretrained, random non-zero weights), ranks {meta['adapters']['ranks']} "
        f"in turn, targets {', '.join(meta['adapters']['target_modules'])}; mean {meta['adapters']['mean_mb']:.2f} MB "
        f"each vs {meta['model']['bytes'] / 1e6:.0f} MB of base weights.",
        f"- Workload (S-LoRA style): {w['num_requests']} requests at {w['rate']} req/s, Gamma arrivals cv={w['cv']}, "
        f"adapter = floor(n·X), X ~ power law alpha; input {w['input']} tokens, output {w['output']} tokens "
        f"(random token ids, greedy, fixed lengths), seed {w['seed']}. SLO: TTFT ≤ {meta['slo_ttft_s']} s.",
        f"- Command: `{meta['command']}`; wall time {meta.get('wall_s', 0):.0f} s; git {meta.get('git', '?')}.",
        "",
        "## Adapter-count sweep (alpha = 1: uniform popularity)", "",
        _table(SERVING_HEADERS, serving_rows(result["count_sweep"])), "",
    ]
    if result.get("alpha_sweep"):
        lines += [f"## Popularity sweep (n = {result['alpha_sweep'][0]['num_adapters']} adapters; "
                  "smaller alpha = a few hot adapters)", "",
                  _table(SERVING_HEADERS, serving_rows(result["alpha_sweep"])), ""]
    ov = result.get("overhead")
    if ov:
        lines += ["## Single-adapter overhead (loraplex, 1 adapter vs none)", "",
                  _table(["measure", "no adapter", "1 adapter", "ratio"], [
                      ["replay out tok/s", _f(ov["base_tok_s"], "{:.1f}"), _f(ov["one_tok_s"], "{:.1f}"), _f(ov["tok_s_ratio"])],
                      ["replay TPOT ms", _ms(ov["base_tpot_s"]), _ms(ov["one_tpot_s"]), _f(ov["tpot_ratio"])],
                      [f"decode step ms (batch {ov['step_batch']})", _f(ov["base_step_ms"], "{:.1f}"),
                       _f(ov["one_step_ms"], "{:.1f}"), _ratio(ov["step_ratio"], ov.get("step_ratio_iqr"))],
                  ] + ([[f"decode step ms (batch {ov['step_batch']}, all-linear adapter)",
                         _f(ov.get("all_linear_base_step_ms"), "{:.1f}"), _f(ov["all_linear_one_step_ms"], "{:.1f}"),
                         _ratio(ov.get("all_linear_step_ratio"), ov.get("all_linear_step_ratio_iqr"))]]
                       if ov.get("all_linear_one_step_ms") else [])),
                  f"\nBound for one adapter: {_f(ov['bound'], '{:.3f}')} (bytes)"
                  + (f"; all-linear: {_f(ov['all_linear_bound'], '{:.3f}')}" if ov.get("all_linear_bound") else "")
                  + ". Of the bound: " + _of_bound(ov.get("step_ratio"), ov.get("step_ratio_iqr"), ov["bound"])
                  + (f" (q,k,v,o), {_of_bound(ov['all_linear_step_ratio'], ov.get('all_linear_step_ratio_iqr'), ov['all_linear_bound'])}"
                     " (all-linear)" if ov.get("all_linear_step_ratio") else "") + ".", ""]
    ms = result.get("multi_step")
    if ms:
        lines += multi_step_lines(ms, meta["model"]["label"])
    de = result.get("decode_efficiency")
    if de:
        lines += [f"## Decode efficiency ({de['model']})", "",
                  "Engine decode step (no adapters) against a floor measured in the same run: the same step's "
                  "dense matmuls alone (every layer's q, k, v, o, gate, up, down projections and the lm_head, "
                  "torch F.linear on the same weights and batch size, same thread count).", "",
                  _table(["batch", "engine step ms", "dense matmul floor ms", "efficiency (floor / step)", "non-matmul ms"],
                         [[str(r["batch"]), _f(r["step_ms"], "{:.1f}"), _f(r["floor_ms"], "{:.1f}"),
                           _f(r["efficiency"], "{:.0%}"), _f(r["step_ms"] - r["floor_ms"], "{:.1f}")] for r in de["rows"]]), ""]
    if result.get("catalog"):
        from bench.catalog import markdown as catalog_markdown

        lines += catalog_markdown(result["catalog"])
    if result.get("fairness"):
        from bench.fairness import markdown as fairness_markdown

        lines += fairness_markdown(result["fairness"])
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


# ---- plots ------------------------------------------------------------------------------------

def plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {"loraplex": "C0", "loraplex-http": "C1", "transformers+peft": "C2"}
    sweep = result["count_sweep"]
    systems = sorted({e["system"] for e in sweep if e["num_adapters"]}, key=lambda s: (not s.startswith("loraplex"), s))
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for s in systems:
        pts = sorted((e["num_adapters"], e["metrics"]) for e in sweep if e["system"] == s and e["num_adapters"])
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ax[0].plot(xs, [p[1]["throughput_tok_s"] for p in pts], marker="o", label=s, color=colors.get(s))
        ax[1].plot(xs, [1000 * (p[1]["ttft_p90_s"] or float("nan")) for p in pts], marker="o", label=s, color=colors.get(s))
    base = [e for e in sweep if not e["num_adapters"]]
    for b in base:
        ax[0].axhline(b["metrics"]["throughput_tok_s"], linestyle="--", color=colors.get(b["system"], "gray"), alpha=0.6,
                      label=f"{b['system']} (no adapters)")
    bound = sorted((e["num_adapters"], e["bound"] * e["metrics"]["throughput_tok_s"] / e["ratio_vs_base"])
                   for e in sweep if e["system"] == "loraplex" and e["num_adapters"] and e.get("bound") and e.get("ratio_vs_base"))
    if bound:
        ax[0].plot([b[0] for b in bound], [b[1] for b in bound], linestyle=":", marker="x", color="black",
                   label="ceiling x bytes bound")
    for a, title, yl in ((ax[0], "Throughput vs adapter count", "output tokens/s"),
                         (ax[1], "TTFT p90 vs adapter count", "ms")):
        a.set_xscale("log", base=2)
        counts_x = sorted({e["num_adapters"] for e in sweep if e["num_adapters"]})
        a.set_xticks(counts_x, [str(c) for c in counts_x])
        a.set_xlabel("adapters (alpha = 1)")
        a.set_ylabel(yl)
        a.set_title(title)
        a.grid(alpha=0.3)
    ax[1].set_yscale("log")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    p = out / "throughput_vs_adapters.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p.name)

    counts = sorted({e["num_adapters"] for e in sweep if e["num_adapters"]})
    fig, axes = plt.subplots(1, max(1, len(counts)), figsize=(3.2 * max(1, len(counts)), 3.4), sharey=True, squeeze=False)
    for a, n in zip(axes[0], counts):
        for e in [e for e in sweep if e["num_adapters"] == n] + base:
            t = sorted(e["metrics"]["ttft_s"])
            if t:
                a.plot([1000 * v for v in t], np.arange(1, len(t) + 1) / len(t),
                       label=e["system"] + (" (no adapters)" if not e["num_adapters"] else ""),
                       linestyle="--" if not e["num_adapters"] else "-", color=colors.get(e["system"]),
                       alpha=0.55 if not e["num_adapters"] else 1.0)
        a.axvline(1000 * result["meta"]["slo_ttft_s"], color="red", alpha=0.4, linewidth=1)
        a.set_xscale("log")
        a.set_title(f"{n} adapters")
        a.set_xlabel("TTFT ms")
        a.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("TTFT distribution (CDF); red line: SLO")
    fig.tight_layout()
    p = out / "ttft_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p.name)

    if result.get("alpha_sweep"):
        fig, a = plt.subplots(figsize=(5.5, 3.8))
        for s in sorted({e["system"] for e in result["alpha_sweep"]}):
            pts = sorted((e["alpha"], e["metrics"]["throughput_tok_s"]) for e in result["alpha_sweep"] if e["system"] == s)
            a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s, color=colors.get(s))
        a.set_xlabel("alpha (1 = uniform)")
        a.set_ylabel("output tokens/s")
        a.set_title(f"Throughput vs popularity skew (n = {result['alpha_sweep'][0]['num_adapters']})")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
        fig.tight_layout()
        p = out / "throughput_vs_alpha.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p.name)
    return written


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = plots(result, out)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(result) + "\n")
