"""`python -m bench.run`: one run, one machine, every system on the same model, adapters and requests.

    python -m bench.run [--cache-dir ~/.cache/loraplex] [--out bench/results/latest] [--quick]

See bench/README.md for the method and what each number means.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import machine

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "latest"
ALL_SYSTEMS = ("loraplex", "http", "peft")

STEP_PROMPT = 16  # prompt tokens of the decode-step cohorts

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split("-"))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"a range is LO-HI with 1 <= LO <= HI, got {text}")
    return lo, hi


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loraplex",
                   help="where the SmolLM2 demo checkpoint lives (built there if missing); generated models and "
                        "adapters are kept under <cache-dir>/bench for the next run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (JSON, Markdown, PNG)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny random model, few requests, seconds")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="subset of loraplex,http,peft")
    p.add_argument("--random-model", action="store_true", help="use a random Llama of SmolLM2's shape, not the demo checkpoint")
    w = p.add_argument_group("workload (S-LoRA style)")
    w.add_argument("--adapter-counts", type=_ints, default=[1, 8, 64, 512])
    w.add_argument("--alphas", type=_floats, default=[0.1, 0.3, 0.6],
                   help="popularity sweep (alpha=1 comes from the count sweep)")
    w.add_argument("--alpha-adapters", type=int, default=64, help="adapter count of the alpha sweep")
    w.add_argument("--num-requests", type=int, default=48)
    w.add_argument("--rate", type=float, default=4.0, help="requests per second")
    w.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of inter-arrival times (1: Poisson)")
    w.add_argument("--input-range", type=_range, default=(8, 32))
    w.add_argument("--output-range", type=_range, default=(8, 32))
    w.add_argument("--input-lens", type=_ints, default=None, help="draw input lengths from this list instead")
    w.add_argument("--output-lens", type=_ints, default=None, help="draw output lengths from this list instead")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--slo-ttft", type=float, default=2.0, help="SLO: time to first token bound, seconds")
    a = p.add_argument_group("adapters")
    a.add_argument("--ranks", type=_ints, default=[4, 8, 16], help="adapter i gets ranks[i %% len(ranks)]")
    a.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    e = p.add_argument_group("engine and baseline")
    e.add_argument("--max-num-seqs", type=int, default=32, help="loraplex batch cap, and the baseline's")
    e.add_argument("--max-active-adapters", type=int, default=40, help="loraplex device slots")
    e.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per process (server and client are separate processes)")
    e.add_argument("--step-batch", type=int, default=32, help="batch of the controlled decode-step measurements")
    e.add_argument("--step-cycles", type=int, default=24,
                   help="decode steps per configuration in the decode-step comparison (the configurations take turns)")
    e.add_argument("--decode-batches", type=_ints, default=[1, 8, 32], help="batches of the decode-efficiency figure")
    c = p.add_argument_group("catalog point (adapters loaded by name, just in time; needs the http system)")
    c.add_argument("--catalog-adapters", type=int, default=2048, help="adapters on disk (hard links of the run's adapters)")
    c.add_argument("--catalog-requests", type=int, default=None, help="requests of the catalog point (default: --num-requests)")
    c.add_argument("--skip-catalog", action="store_true")
    p.add_argument("--skip-decode-efficiency", action="store_true")
    f = p.add_argument_group("fairness point (two tenants, one at 10x the other's rate; fcfs against vtc)")
    f.add_argument("--skip-fairness", action="store_true")
    f.add_argument("--fairness-window", type=int, default=48, help="steps with arrivals per replay")
    f.add_argument("--fairness-rho", type=float, default=0.5, help="light tenant's rate as a share of capacity")
    p.add_argument("--skip-all-linear", action="store_true",
                   help="skip the decode-step measurement with adapters on all seven projections")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = set(args.systems) - set(ALL_SYSTEMS)
    if bad:
        p.error(f"unknown systems {sorted(bad)}")
    if args.quick:
        args.adapter_counts = [1, 4]
        args.alphas = [0.5]
        args.alpha_adapters = 4
        args.num_requests = 10
        args.rate = 20.0
        args.input_range, args.output_range = (4, 12), (2, 6)
        args.input_lens = args.output_lens = None
        args.ranks = [2, 4]
        args.max_num_seqs, args.max_active_adapters = 4, 4
        args.step_batch = 4
        args.step_cycles = 4
        args.decode_batches = [1, 4]
        args.catalog_requests = 12
        args.fairness_window = 16
    return args


# ---- the run ----------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the HTTP server subprocess inherits it
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    from bench import assets, report, stepbench, systems, workload

    t_start = time.perf_counter()
    load_before = machine.load_average()
    out = args.out.expanduser().resolve()
    tmp_work = None
    if args.quick:
        tmp_work = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
        work = tmp_work
    else:
        work = args.cache_dir.expanduser().resolve() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = _run(args, work, out, torch, assets, report, stepbench, systems, workload)
    finally:
        if tmp_work is not None:
            shutil.rmtree(tmp_work, ignore_errors=True)
    result["meta"]["load_before"] = load_before
    result["meta"]["load_after"] = machine.load_average()
    result["meta"]["wall_s"] = time.perf_counter() - t_start
    report.write_outputs(result, out)
    log.info("done in %.0fs: %s", result["meta"]["wall_s"], out)
    print(report.markdown(result))
    return 0


def _run(args, work: Path, out: Path, torch, assets, report, stepbench, systems, workload) -> dict:
    cache_dir = None if args.random_model else args.cache_dir.expanduser().resolve()
    model = assets.main_model(cache_dir, work, args.quick)
    log.info("model: %s (%s) at %s", model.label, model.source, model.path)
    targets = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    n_max = max(args.adapter_counts + ([args.alpha_adapters] if args.alphas else []))
    tag = "quick" if args.quick else model.path.name
    adapter_dir = work / f"adapters-{tag}"
    adapters = assets.make_adapters(model, adapter_dir, n_max, args.ranks, targets, seed=args.seed)
    names = [a.name for a in adapters]
    settings = systems.EngineSettings(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max(256, args.max_num_seqs * 16),
        max_model_len=max(STEP_PROMPT + args.step_cycles + 8,
                          args.input_range[1] + args.output_range[1] + 16 if not (args.input_lens or args.output_lens)
                          else max(args.input_lens or [args.input_range[1]]) + max(args.output_lens or [args.output_range[1]]) + 16),
        max_active_adapters=args.max_active_adapters, max_cpu_adapters=max(64, n_max + 8),
        max_lora_rank=max(args.ranks))

    def spec(n: int, alpha: float = 1.0, num: int | None = None, seed: int | None = None) -> workload.WorkloadSpec:
        return workload.WorkloadSpec(
            num_requests=num or args.num_requests, rate=args.rate, num_adapters=n, alpha=alpha, cv=args.cv,
            input_range=args.input_range, output_range=args.output_range,
            input_lens=tuple(args.input_lens) if args.input_lens else None,
            output_lens=tuple(args.output_lens) if args.output_lens else None,
            vocab_size=model.shape["vocab_size"], seed=args.seed if seed is None else seed)

    # Every workload shares the seed: same arrivals, lengths and prompts; only adapter ids differ.
    runs = [("count", 0, 1.0)] + [("count", n, 1.0) for n in args.adapter_counts] + \
           [("alpha", args.alpha_adapters, a) for a in args.alphas]
    loads = {key: workload.generate(spec(key[1], key[2])) for key in runs}
    warmup = workload.generate(spec(min(4, n_max), 1.0, num=min(8, args.num_requests), seed=args.seed + 1))
    used = sorted({names[r.adapter] for reqs in loads.values() for r in reqs if r.adapter >= 0} |
                  {names[r.adapter] for r in warmup if r.adapter >= 0})
    adapter_mb = sum(a.nbytes for a in adapters) / len(adapters) / 1e6
    base_bytes = assets.decode_bytes(model.shape)

    entries: list[dict] = []
    notes: list[str] = []
    multi_rows: list[dict] = []
    step_results: list[dict] = []
    overhead: dict = {}

    def add(system: str, key, run) -> dict:
        m = report.run_metrics(run, args.slo_ttft)
        reqs = loads[key]
        used_bytes = [adapters[r.adapter].nbytes for r in reqs if r.adapter >= 0]
        entry = {"system": system, "sweep": key[0], "num_adapters": key[1], "alpha": key[2], "metrics": m,
                 "workload": workload.summary(reqs), "distinct_per_step": m.get("x_distinct_per_step"),
                 "adapter_bytes": (sum(used_bytes) / len(used_bytes)) if used_bytes else 0.0}
        entries.append(entry)
        log.info("%-16s n=%-4d alpha=%-4g %6.1f tok/s  TTFT p50 %5.0f ms p99 %5.0f ms  batch %.1f  %s", system, key[1],
                 key[2], m["throughput_tok_s"], 1000 * (m["ttft_p50_s"] or 0), 1000 * (m["ttft_p99_s"] or 0),
                 m.get("x_mean_batch") or 0, f"{m['errors']} errors: {m['first_error']}" if m["errors"] else "")
        return entry

    # All systems are up at once and take turns on each workload, so that a slow patch of a
    # shared machine hits every system rather than one.
    lp = srv = hf = None
    base_repeat = None
    step_names = [a.name for a in adapters[:args.step_batch]]
    # The same decode-step measurement with adapters on all seven projections ("all-linear", the
    # default of many training recipes), in a subfolder of the adapter dir (the engine serves
    # only from there).
    all_linear = [] if args.skip_all_linear or "loraplex" not in args.systems else assets.make_adapters(
        model, adapter_dir / "all-linear", min(args.step_batch, args.max_active_adapters), args.ranks,
        list(assets.ALL_LINEAR), seed=args.seed, prefix="all")
    try:
        if "loraplex" in args.systems:
            # KV room for the decode-step cohorts that live beside each other (at most three)
            per_seq = -(-(STEP_PROMPT + args.step_cycles + 4) // settings.block_size)
            lp = systems.make_engine(model, dataclasses.replace(settings, extra_kv_blocks=3 * args.step_batch * per_seq),
                                     adapter_dir)
            warm_s = systems.register_adapters(lp, adapters + all_linear, used + [a.name for a in all_linear])
            log.info("loraplex: %d adapters registered, %d loaded into host RAM in %.1fs", len(adapters), len(used), warm_s)
            systems.run_loraplex_inproc(lp, warmup, names, "warm-up")
        if "http" in args.systems:
            if systems.engine_command() is None:
                notes.append("loraplex over HTTP was skipped: loraplex.engine.api.cli is not importable in this environment.")
            else:
                try:
                    t0 = time.perf_counter()
                    srv = systems.HttpEngine(model, settings, adapters, adapter_dir, work / "http")
                    srv.warm(used, model.shape["vocab_size"])
                    srv.replay(warmup, names, "warm-up")
                    log.info("loraplex-engine up on %s, %d adapters warm, in %.1fs", srv.url, len(used), time.perf_counter() - t0)
                except Exception as exc:  # the report says what failed instead of losing the other systems
                    log.exception("loraplex over HTTP failed to start")
                    notes.append(f"loraplex over HTTP failed to start: {type(exc).__name__}: {exc}"[:500])
                    if srv is not None:
                        srv.close()
                    srv = None
        if "peft" in args.systems:
            peft_names = sorted(set(used) | set(step_names))
            hf = systems.HFPeftServer(model, adapters, peft_names)
            log.info("transformers+PEFT: %d adapters loaded into one PeftModel in %.1fs", len(hf.loaded), hf.load_seconds)
            hf.replay(warmup, names, args.max_num_seqs, "warm-up")

        for key in runs:
            if lp is not None:
                add("loraplex", key, systems.run_loraplex_inproc(lp, loads[key], names, "loraplex"))
            if srv is not None and key[0] == "count":
                try:
                    add("loraplex-http", key, srv.replay(loads[key], names, "loraplex-http"))
                except Exception as exc:
                    log.exception("loraplex over HTTP failed")
                    notes.append(f"loraplex over HTTP failed on n={key[1]}: {type(exc).__name__}: {exc}"[:500])
            if hf is not None and key[1] > 0:
                add("transformers+peft", key, hf.replay(loads[key], names, args.max_num_seqs, "transformers+peft"))

        if lp is not None:  # the ceiling again, last: how far apart two runs of the same thing land
            rerun = report.run_metrics(systems.run_loraplex_inproc(lp, loads[("count", 0, 1.0)], names, "loraplex"),
                                       args.slo_ttft)
            base_repeat = rerun["throughput_tok_s"]
            log.info("loraplex base again: %.1f tok/s", base_repeat)

        # controlled decode steps: batch b, d distinct adapters, each configuration against none,
        # interleaved step by step (bench.stepbench.compare).
        b = args.step_batch
        ds = sorted({d for d in (1, min(8, b), min(b, args.max_active_adapters)) if d <= len(step_names)})
        if lp is not None:
            step_results += stepbench.engine_comparison(
                lp, b, ds, step_names, [a.name for a in all_linear], args.max_active_adapters, args.step_cycles, STEP_PROMPT)
        if hf is not None:
            make = {("transformers+peft", d): (lambda n=step_names[:d]: stepbench.PeftCohort(hf.model, b, n, STEP_PROMPT))
                    for d in [0] + ds}
            step_results.append(stepbench.compare(make, ("transformers+peft", 0), args.step_cycles))
        for (system, d), row in stepbench.merge_groups(step_results).items():
            used_set = all_linear if system.endswith("(all-linear)") else adapters
            abytes = sum(used_set[i].nbytes for i in range(d)) / d if d else 0.0
            multi_rows.append({"system": system, "distinct": d, **row,
                               "bound": report.bytes_bound(base_bytes, d, abytes) if d else 1.0})
    finally:
        if srv is not None:
            srv.close()
        if hf is not None:
            hf.close()
        del lp, hf
        gc.collect()

    # 4. decode efficiency on the larger model ------------------------------------------------------
    decode_eff = None
    if not args.skip_decode_efficiency:
        large = assets.large_model(work, args.quick)
        s = systems.EngineSettings(max_num_seqs=max(args.decode_batches), max_model_len=64, max_active_adapters=1,
                                   max_lora_rank=8, max_num_batched_tokens=max(256, 16 * max(args.decode_batches)))
        eng = systems.make_engine(large, s)
        rows = []
        for b in args.decode_batches:
            step, floor = stepbench.engine_decode_steps(eng, b, [], prompt_len=4, steps=7 if b > 8 else 9,
                                                        between=stepbench.dense_pass(eng.runner.model, b))
            rows.append({"batch": b, "step_ms": step, "floor_ms": floor, "efficiency": floor / step})
            log.info("decode efficiency %s batch %d: step %.1f ms, matmul floor %.1f ms", large.label, b, step, floor)
        decode_eff = {"model": f"{large.label} params, fp32, no adapters", "rows": rows}
        del eng
        gc.collect()

    # 5. fairness across tenants: its own engine, on the run's model -----------------------------------
    fairness_point = None
    if not args.skip_fairness and "loraplex" in args.systems:
        from bench import fairness

        try:
            fairness_point = fairness.run_fairness_point(
                model.path, max_num_seqs=args.max_num_seqs, rho=args.fairness_rho, window=args.fairness_window,
                drain=args.fairness_window // 3, warm=args.fairness_window // 3,
                calibrate_steps=8 if args.quick else 12, seed=args.seed,
                threads=args.threads)
            v, f = fairness_point["vtc"], fairness_point["fcfs"]
            log.info("fairness: light tenant's token share %.0f%% under vtc, %.0f%% under fcfs; TTFT p99 %.2fx of solo "
                     "under vtc", 100 * v["share"]["light"], 100 * f["share"]["light"], v["light_ttft_p99_vs_solo"])
        except Exception as exc:  # the report says what failed instead of losing the rest
            log.exception("the fairness point failed")
            notes.append(f"the fairness point failed: {type(exc).__name__}: {exc}"[:500])

    # ratios ----------------------------------------------------------------------------------------
    base = next((e for e in entries if e["system"] == "loraplex" and e["num_adapters"] == 0), None)
    base_tok_s = None
    if base is not None:
        first = base["metrics"]["throughput_tok_s"]
        base_tok_s = (first + base_repeat) / 2 if base_repeat else first
        if base_repeat:
            notes.append(f"Noise: the ceiling (loraplex, no adapters) was replayed first and last: {first:.1f} and "
                         f"{base_repeat:.1f} tok/s ({abs(first - base_repeat) / max(first, base_repeat):.0%} apart); "
                         f"replay ratios use their mean, {base_tok_s:.1f}. Replay ratios closer than that spread "
                         "are ties; the controlled decode-step table is the precise comparison.")
    for e in entries:
        if base_tok_s:
            e["ratio_vs_base"] = e["metrics"]["throughput_tok_s"] / base_tok_s
        if e["num_adapters"] and e["distinct_per_step"] is not None:
            e["bound"] = report.bytes_bound(base_bytes, e["distinct_per_step"], e["adapter_bytes"])
    one = next((e for e in entries if e["system"] == "loraplex" and e["num_adapters"] == 1 and e["sweep"] == "count"), None)
    lp_steps = {r["distinct"]: r for r in multi_rows if r["system"] == "loraplex"}
    if base and one:
        overhead = {
            "base_tok_s": base_tok_s, "one_tok_s": one["metrics"]["throughput_tok_s"],
            "tok_s_ratio": one["metrics"]["throughput_tok_s"] / base_tok_s,
            "base_tpot_s": base["metrics"]["tpot_mean_s"], "one_tpot_s": one["metrics"]["tpot_mean_s"],
            "tpot_ratio": (base["metrics"]["tpot_mean_s"] or 0) / (one["metrics"]["tpot_mean_s"] or 1),
            "step_batch": args.step_batch,
            "base_step_ms": lp_steps.get(0, {}).get("step_ms"), "one_step_ms": lp_steps.get(1, {}).get("step_ms"),
            "step_ratio": lp_steps[1].get("ratio") if 1 in lp_steps else None,
            "step_ratio_iqr": lp_steps[1].get("ratio_iqr") if 1 in lp_steps else None,
            "cpu_step_ratio": lp_steps[1].get("cpu_ratio") if 1 in lp_steps else None,
            "bound": report.bytes_bound(base_bytes, 1, adapters[0].nbytes),
        }
        al_steps = {r["distinct"]: r for r in multi_rows if r["system"] == "loraplex (all-linear)"}
        if 1 in al_steps:
            overhead.update({"all_linear_base_step_ms": lp_steps.get(0, {}).get("step_ms"),
                             "all_linear_one_step_ms": al_steps[1]["step_ms"],
                             "all_linear_step_ratio": al_steps[1].get("ratio"),
                             "all_linear_step_ratio_iqr": al_steps[1].get("ratio_iqr"),
                             "all_linear_cpu_step_ratio": al_steps[1].get("cpu_ratio"),
                             "all_linear_bound": report.bytes_bound(base_bytes, 1, all_linear[0].nbytes)})
    order = {"loraplex": 0, "loraplex (all-linear)": 0.5, "loraplex-http": 1, "transformers+peft": 2}
    key = lambda e: (e["num_adapters"], order.get(e["system"], 9), e["alpha"])  # noqa: E731
    count_sweep = sorted([e for e in entries if e["sweep"] == "count"], key=key)
    alpha_sweep = sorted([e for e in entries if e["sweep"] == "alpha" or
                          (e["num_adapters"] == args.alpha_adapters and e["sweep"] == "count" and args.alphas)],
                         key=lambda e: (order.get(e["system"], 9), e["alpha"]))
    alpha_sweep = [e for e in alpha_sweep if e["system"] != "loraplex-http"]
    catalog_point = None
    if "http" in args.systems and not args.skip_catalog and systems.engine_command() is not None:
        from bench import catalog

        n_req = args.catalog_requests or args.num_requests
        try:
            catalog_point = catalog.run_catalog_point(
                model, settings, adapters, work, args.catalog_adapters,
                workload.generate(spec(args.catalog_adapters, 1.0, num=n_req)), workload.generate(spec(1, 1.0, num=n_req)),
                systems, report, args.slo_ttft)
        except Exception as exc:  # the report says what failed instead of losing the rest
            log.exception("the catalog point failed")
            notes.append(f"the catalog point failed: {type(exc).__name__}: {exc}"[:500])
    if args.quick:
        notes.append("--quick: a tiny random model and a handful of requests; the numbers only prove the pipeline runs.")
    first_spec = spec(0)
    return {
        "meta": {
            "command": "python -m bench.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if sys.argv[0].endswith("run.py") or "bench" in sys.argv[0] else [])),
            "machine": machine.machine_info(), "torch": torch.__version__, "threads": args.threads, "git": machine.git_rev(),
            "python": platform.python_version(), "quick": args.quick, "slo_ttft_s": args.slo_ttft,
            "model": {"label": model.label, "source": model.source, "path": str(model.path),
                      "num_params": model.num_params, "bytes": base_bytes, "shape": model.shape},
            "adapters": {"count": len(adapters), "ranks": args.ranks, "target_modules": targets,
                         "mean_mb": adapter_mb, "dir": str(adapter_dir)},
            "engine_settings": settings.__dict__,
            "workload": {**first_spec.describe(), "input": (f"from {args.input_lens}" if args.input_lens else
                                                            f"uniform {args.input_range[0]}-{args.input_range[1]}"),
                         "output": (f"from {args.output_lens}" if args.output_lens else
                                    f"uniform {args.output_range[0]}-{args.output_range[1]}")},
            "systems": args.systems,
        },
        "count_sweep": count_sweep,
        "alpha_sweep": alpha_sweep if args.alphas else [],
        "overhead": overhead,
        "multi_step": {"batch": args.step_batch, "rows": sorted(multi_rows, key=lambda r: (order.get(r["system"], 9), r["distinct"]))}
        if multi_rows else None,
        "decode_efficiency": decode_eff,
        "catalog": catalog_point,
        "fairness": fairness_point,
        "notes": notes,
    }


if __name__ == "__main__":
    sys.exit(main())
