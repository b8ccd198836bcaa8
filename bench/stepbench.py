"""Controlled decode-step measurements (no arrival process): median step times at a fixed batch.

- `engine_decode_steps`: loraplex's decode step with `batch` rows, rows spread round-robin over
  `distinct` adapters (0: no adapter).
- `dense_floor`: the same step's dense matmuls timed alone: F.linear on every projection of every
  layer plus the lm_head, with the engine's own weights and the same batch size.
- `compare`: the configurations to be compared (no adapter, one adapter, d adapters, ...) decode
  at the same time, as cohorts that take turns step by step (`EngineCohort`; `PeftCohort`, the
  same decode step through transformers + PEFT with mixed `adapter_names`), and
  each configuration's ratio against the baseline is the median of ratios of steps taken side by
  side, with its spread. This is the method of the decode-step tables: see `compare`.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def engine_decode_steps(engine, batch: int, adapters: list[str], prompt_len: int = 16, steps: int = 10,
                        between=None) -> float | tuple[float, float]:
    """Median decode-step milliseconds; `adapters` lists one name per distinct adapter (may be empty).

    With `between` (a callable), it also runs and times that callable between decode steps and
    returns (step ms, between ms), both medians: the two alternate, so a slow patch of a shared
    machine slows both alike."""
    from loraplex.engine.core.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 3, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"step-{time.perf_counter_ns()}-{i}", cohort_prompt(i, prompt_len), params,
                           adapters[i % len(adapters)] if adapters else None)
    deadline = time.monotonic() + 120
    while engine.scheduler.waiting and time.monotonic() < deadline:  # prefill (and any adapter loads)
        if not engine.step():
            time.sleep(0.002)
    engine.step()  # the last prefill chunk, if any, or a first decode
    times, other = [], []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
        if between is not None and engine.has_unfinished():
            t = time.perf_counter()
            between()
            other.append(time.perf_counter() - t)
    # every row decodes in every step here (same lengths): drop the final, possibly partial step
    step_ms = 1000 * statistics.median(times[:-1] or times)
    return (step_ms, 1000 * statistics.median(other)) if between is not None else step_ms


def dense_floor(model, batch: int, repeats: int = 5) -> float:
    """Median milliseconds of the step's dense matmuls alone."""
    run = dense_pass(model, batch)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def dense_pass(model, batch: int):
    """A callable doing one step's dense matmuls: F.linear on every projection and the lm_head."""
    weights = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        weights += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                    m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
    weights.append(model.lm_head.weight)
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}
    @torch.inference_mode()
    def run() -> None:
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    run()  # warm
    return run


# ---- interleaved comparison -------------------------------------------------------------------
#
# Why: on a shared machine the speed drifts by tens of percent over seconds (other jobs start and
# stop). Measuring one configuration for a while and then the next one puts that drift into their
# ratio: a snapshot once measured the same no-adapter step at 177.5 and 184.2 ms a minute apart,
# and the all-linear ratio at 0.86 in one run and 0.98 in another. Here every configuration is a
# live cohort of sequences, the cohorts take one decode step each in turn (the order rotating
# every cycle, so that none always follows the same one), and a configuration's ratio against the
# baseline is the median over cycles of baseline step / its step within the same cycle (a few
# hundred milliseconds apart). The interquartile range of those ratios is the spread.


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), linear interpolation."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def cohort_prompt(row: int, length: int) -> list[int]:
    """Row `row`'s prompt token ids (the same in every cohort and in `engine_decode_steps`)."""
    return [(7 * row + j) % 200 + 10 for j in range(length)]


class EngineCohort:
    """`batch` sequences on `adapters` (round-robin; empty: none), prefilled, then detached from the
    scheduler: `step()` puts them back as its running set, runs one full `engine.step()` (schedule,
    forward, sample, outputs) and takes them out again, so several cohorts live in one engine and
    decode in turn. Nothing else may run on the engine meanwhile; `close()` aborts the cohort."""

    def __init__(self, engine, batch: int, adapters: list[str], prompt_len: int, steps: int, tag: str):
        from loraplex.engine.core.sampling_params import SamplingParams

        self.engine = engine
        sched = engine.scheduler
        if sched.running or sched.waiting:
            raise RuntimeError("the engine must be idle to start a cohort")
        # room for `steps` decodes plus the one after prefill; the cohort is closed before it ends
        params = SamplingParams(max_tokens=steps + 3, temperature=0.0, ignore_eos=True)
        self.ids = [f"cohort-{tag}-{time.perf_counter_ns()}-{i}" for i in range(batch)]
        self.seqs = [engine.add_request(rid, cohort_prompt(i, prompt_len), params,
                                        adapters[i % len(adapters)] if adapters else None)
                     for i, rid in enumerate(self.ids)]
        deadline = time.monotonic() + 120
        while sched.waiting and time.monotonic() < deadline:  # prefill (and any adapter loads)
            if not engine.step():
                time.sleep(0.002)
        if sched.waiting or len(sched.running) != batch:
            raise RuntimeError(f"cohort {tag}: {len(sched.waiting)} sequences still waiting after 120 s "
                               "(too few adapter slots or KV blocks for the cohorts alive at once?)")
        while any(s.num_computed_tokens < s.num_tokens - 1 for s in sched.running):
            engine.step()  # the last prefill chunk: from now on every step decodes every row
        self.running, sched.running = sched.running, []

    def step(self) -> tuple[float, float]:
        """One engine step of this cohort alone: (wall seconds, this thread's CPU seconds)."""
        sched = self.engine.scheduler
        sched.running, n = self.running, len(self.running)
        t, c = time.perf_counter(), time.thread_time()
        self.engine.step()
        elapsed = time.perf_counter() - t, time.thread_time() - c
        if len(sched.running) != n or sched.waiting:
            raise RuntimeError(f"a cohort sequence finished or was preempted while measured ({n} running before the "
                               f"step, {len(sched.running)} after, {len(sched.waiting)} waiting)")
        self.running, sched.running = sched.running, []
        return elapsed

    def close(self) -> None:
        self.engine.scheduler.running = self.running
        for rid in self.ids:
            self.engine.abort(rid)
        self.running = []


class PeftCohort:
    """The same for transformers + PEFT: `batch` rows with `adapter_names` round-robin ('__base__'
    for none, or an empty list), their own KV cache, one `step()` = one decode forward."""

    def __init__(self, model, batch: int, adapter_names: list[str], prompt_len: int):
        self.model = model
        ids = torch.tensor([cohort_prompt(i, prompt_len) for i in range(batch)])
        names = [adapter_names[i % len(adapter_names)] for i in range(batch)] if adapter_names else ["__base__"] * batch
        self.kwargs = {"adapter_names": names} if hasattr(model, "peft_config") else {}
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, **self.kwargs)
        self.cache, self.next = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        self.mask = torch.ones(batch, prompt_len, dtype=torch.long)

    @torch.inference_mode()
    def step(self) -> tuple[float, float]:
        self.mask = torch.cat([self.mask, torch.ones(self.mask.shape[0], 1, dtype=torch.long)], dim=1)
        t, c = time.perf_counter(), time.thread_time()
        out = self.model(input_ids=self.next, attention_mask=self.mask, past_key_values=self.cache, use_cache=True,
                         **self.kwargs)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)
        elapsed = time.perf_counter() - t, time.thread_time() - c
        self.cache = out.past_key_values
        return elapsed

    def close(self) -> None:
        self.cache = None


def interleave(steps: dict[str, Callable[[], tuple[float, float]]], cycles: int,
               warmup: int = 1) -> dict[str, list[tuple[float, float]]]:
    """Call every step function once per cycle, the order rotating by one each cycle; per name
    the (wall, CPU) seconds of each measured cycle (index i = cycle i). `warmup` cycles are run
    first and dropped (first-touch page faults, allocator growth)."""
    names = list(steps)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for c in range(warmup + cycles):
        k = c % len(names)
        for n in names[k:] + names[:k]:
            t = steps[n]()
            if c >= warmup:
                times[n].append(t)
    return times


def summarize(times: dict[str, list[tuple[float, float]]], baseline: str) -> dict[str, dict]:
    """Per name, for wall time and for CPU time (this thread's, which leaves out the time the OS
    gave other processes): the median step ms with its interquartile range, and the ratio
    against `baseline` (baseline step / this step within each cycle; median and interquartile
    range over cycles)."""
    out = {}
    for name, ts in times.items():
        row: dict = {"steps": len(ts)}
        for i, clock in enumerate(("", "cpu_")):
            lo, med, hi = quantiles([1000 * t[i] for t in ts])
            rlo, rmed, rhi = quantiles([b[i] / t[i] for b, t in zip(times[baseline], ts)])
            row.update({f"{clock}step_ms": med, f"{clock}step_ms_iqr": [lo, hi],
                        f"{clock}ratio": rmed, f"{clock}ratio_iqr": [rlo, rhi]})
        out[name] = row
    return out


def compare(make: dict[str, Callable[[], object]], baseline: str, cycles: int) -> dict[str, dict]:
    """Build the cohorts (`make[name]()` -> an object with step() and close()), interleave them
    for `cycles` cycles, close them, and `summarize` against `baseline`."""
    cohorts = {}
    try:
        for name, factory in make.items():
            cohorts[name] = factory()
        times = interleave({n: c.step for n, c in cohorts.items()}, cycles)
    finally:
        for c in cohorts.values():
            c.close()
    return summarize(times, baseline)


def slot_groups(configs: list[tuple], slots: int, size: int = 2) -> list[list[tuple]]:
    """Split `configs` ((system, d, adapter names), in order) into consecutive groups of at most
    `size` whose cohorts can live beside each other (and beside the baseline's): the distinct
    adapters of a group's cohorts fit in `slots` device slots (a cohort pins its adapters' slots
    while it lives). The engine needs KV room for size + 1 cohorts."""
    groups: list[list[tuple]] = []
    used: set[str] = set()
    for cfg in configs:
        names = set(cfg[2])
        if groups and len(groups[-1]) < size and len(used | names) <= slots:
            groups[-1].append(cfg)
            used |= names
        else:
            groups.append([cfg])
            used = names
    return groups


def merge_groups(results: list[dict]) -> dict:
    """One row per configuration from several `compare` results. The baseline, measured in every
    group, keeps its row from the first group."""
    merged: dict = {}
    for res in results:
        for key, row in res.items():
            merged.setdefault(key, row)
    return merged


def engine_comparison(engine, batch: int, distinct: list[int], qkvo: list[str], all_linear: list[str], slots: int,
                      cycles: int, prompt_len: int, log=None) -> list[dict]:
    """The decode-step comparison of bench.run: for each d in `distinct`, d adapters targeting
    q,k,v,o (`qkvo`, rows "loraplex") and d adapters on all seven projections (`all_linear`,
    rows "loraplex (all-linear)"; skipped when empty), each against no adapter (row
    ("loraplex", 0)), interleaved in groups that fit the engine's `slots`. One `compare` result
    per group."""
    configs = [(system, d, names[:d]) for d in distinct for system, names in
               (("loraplex", qkvo), ("loraplex (all-linear)", all_linear)) if d <= len(names)]
    results = []
    for group in slot_groups(configs, slots):
        make = {("loraplex", 0): lambda: EngineCohort(engine, batch, [], prompt_len, cycles + 1, "base")}
        for system, d, names in group:
            make[(system, d)] = lambda n=names, t=f"{system}-{d}": EngineCohort(engine, batch, n, prompt_len, cycles + 1, t)
        res = compare(make, ("loraplex", 0), cycles)
        if log is not None:
            log("decode steps: " + "; ".join(f"{s} d={d}: {r['step_ms']:.1f} ms, ratio {r['ratio']:.3f} "
                                             f"[{r['ratio_iqr'][0]:.3f}-{r['ratio_iqr'][1]:.3f}]" for (s, d), r in res.items()))
        results.append(res)
    return results


def main(argv=None) -> int:
    """`python -m bench.stepbench`: the decode-step comparison of bench.run alone (loraplex, one
    adapter and d adapters, q,k,v,o and all-linear), minutes instead of a full run."""
    import argparse
    import os
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m bench.stepbench", description=main.__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loraplex",
                    help="as bench.run: the demo checkpoint and <cache-dir>/bench's adapters (built if missing)")
    ap.add_argument("--random-model", action="store_true", help="a random Llama of SmolLM2's shape")
    ap.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--distinct", default="1", help="comma-separated d (distinct adapters per step)")
    ap.add_argument("--cycles", type=int, default=24, help="decode steps per configuration")
    ap.add_argument("--ranks", default="4,8,16", help="adapter i gets ranks[i %% len(ranks)] (as bench.run)")
    ap.add_argument("--no-qkvo", action="store_true", help="only the all-linear rows (and the baseline)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import json
    import tempfile

    from bench import assets, machine, report, systems

    distinct = [int(x) for x in args.distinct.split(",") if x.strip()]
    ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    load_before = machine.load_average()
    with tempfile.TemporaryDirectory(prefix="loraplex-stepbench-") as tmp:
        work = Path(tmp) if args.quick else args.cache_dir.expanduser().resolve() / "bench"
        model = assets.main_model(None if args.random_model else args.cache_dir.expanduser().resolve(), work, args.quick)
        adapter_dir = work / f"adapters-{'quick' if args.quick else model.path.name}"
        n = max(distinct)
        qkvo = [] if args.no_qkvo else assets.make_adapters(model, adapter_dir, n, ranks, ["q_proj", "k_proj", "v_proj", "o_proj"])
        al = assets.make_adapters(model, adapter_dir / "all-linear", n, ranks, list(assets.ALL_LINEAR), prefix="all")
        per_seq = -(-(16 + args.cycles + 4) // 16)
        settings = systems.EngineSettings(max_num_seqs=args.batch, max_num_batched_tokens=max(256, 16 * args.batch),
                                          max_model_len=16 + args.cycles + 8, max_active_adapters=max(2 * n, 1),
                                          max_cpu_adapters=2 * n + 8, max_lora_rank=max(ranks),
                                          extra_kv_blocks=3 * args.batch * per_seq)
        engine = systems.make_engine(model, settings, adapter_dir)
        systems.register_adapters(engine, qkvo + al, [a.name for a in qkvo + al])
        EngineCohort(engine, args.batch, [], 16, 3, "warm-up").close()
        results = engine_comparison(engine, args.batch, distinct, [a.name for a in qkvo], [a.name for a in al],
                                    settings.max_active_adapters, args.cycles, 16)
        nbytes = {a.name: a.nbytes for a in qkvo + al}
        base_bytes = assets.decode_bytes(model.shape)
    rows = []
    for (system, d), row in merge_groups(results).items():
        names = ([a.name for a in al] if system.endswith("(all-linear)") else [a.name for a in qkvo])[:d]
        abytes = sum(nbytes[x] for x in names) / d if d else 0.0
        rows.append({"system": system, "distinct": d, **row, "bound": report.bytes_bound(base_bytes, d, abytes) if d else 1.0})
    ms = {"batch": args.batch, "rows": rows}
    print(f"{model.label}, batch {args.batch}, {args.cycles} steps per configuration, {args.threads} thread(s); "
          f"load average before {load_before}, after {machine.load_average()}")
    print("\n".join(report.multi_step_lines(ms, model.label)))
    if args.json:
        args.json.write_text(json.dumps({"load_before": load_before, "load_after": machine.load_average(), **ms}, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
