"""Measure the engine's own step times and adapter load times: the inputs of the simulator's fit.

    python -m bench.fleet_sim.measure [--cache-dir ~/.cache/loraplex] [--out bench/fleet_sim/data/engine_costs.json]

It drives `LLMEngine.step()` in process on a random Llama of SmolLM2-135M's shape (fp32, one
torch thread, as each real replica runs here) through randomized trials:
- a trial starts `rows` requests spread round-robin over `distinct` adapters, decodes them, and
  part-way through adds `extra` requests with `extra_len`-token prompts, so that prefill-only,
  decode-only and mixed steps are all measured;
- every step is recorded with its composition (rows, decode rows, prefill tokens, distinct
  adapters) and its wall time, read from the scheduler's own batch;
- a step that copied an adapter into a device slot is timed but kept out of the step-cost
  samples: that copy is measured on its own (host -> device), as is the disk -> host load
  (`AdapterManager` fetch + parse, which runs on its loader pool);
- the engine's start (`LLMEngine(config)`: the model read from disk, its slots and KV cache
  allocated) is timed too: the model-load part of a replica's cold start.

The random weights do not change any timing: requests use `ignore_eos` and fixed lengths.
The machine is shared, so the load average is recorded next to the samples. Other jobs only
ever slow a step down, so one run on a busy machine can fit nonsense (a negative cost per
adapter); `--append` pools another run of the same engine into the file (`meta.runs` lists
each run) and the fit then uses every sample.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "engine_costs.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK = 8

log = logging.getLogger("bench.fleet_sim")


def assets(cache_dir: Path, num_adapters: int, tiny: bool = False):
    """The SmolLM2-shaped random Llama (or, `tiny`, the tests' tiny one) and `num_adapters`
    rank-8 PEFT adapters for it (built once, reused)."""
    from bench.assets import SMOLLM2_SHAPE, TINY_SHAPE, ModelInfo, count_params, make_adapters, random_llama

    work = cache_dir / "bench" / "fleet_sim" / ("tiny" if tiny else "")
    shape, label = (TINY_SHAPE, "tiny random Llama") if tiny else (SMOLLM2_SHAPE, "random Llama, SmolLM2-135M shape")
    path = random_llama(work / ("tiny-llama" if tiny else "smollm2-shape-random"), shape)
    model = ModelInfo(path, label, "random", count_params(shape), shape)
    adapters = make_adapters(model, work / "adapters", num_adapters, [RANK], TARGETS)
    return model, adapters, work / "adapters"


def _composition(batch) -> tuple[int, int, int, int]:
    rows = len(batch)
    decode = sum(1 for it in batch if it.seq.num_computed_tokens > 0 and it.num_tokens == 1)
    prefill_tokens = sum(it.num_tokens for it in batch if not (it.seq.num_computed_tokens > 0 and it.num_tokens == 1))
    distinct = len({it.seq.adapter for it in batch if it.seq.adapter is not None})
    return rows, decode, prefill_tokens, distinct


def measure(cache_dir: Path, trials: int, seed: int) -> dict:
    from bench.systems import EngineSettings, make_engine, register_adapters
    from loraplex.engine.core.sampling_params import SamplingParams

    import torch

    torch.set_num_threads(1)
    model, adapters, adapter_dir = assets(cache_dir, 48)
    settings = EngineSettings(max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=512, max_active_adapters=16,
                              max_cpu_adapters=64, max_lora_rank=RANK)
    t_engine = time.perf_counter()
    engine = make_engine(model, settings, adapter_dir)
    engine_start = time.perf_counter() - t_engine
    mgr = engine.adapters

    # disk -> host: the manager's own load timing (fetch + parse on its loader pool), one at a time
    disk_s = []
    from loraplex.manifest import AdapterManifest
    for a in adapters:
        engine.adapters.register(AdapterManifest(name=a.name, uri=str(a.path)))
    for a in adapters[16:]:
        mgr.request_load(a.name)
        while mgr.get(a.name)["state"] not in ("host", "device", "failed"):
            time.sleep(0.002)
        if mgr.get(a.name)["state"] == "failed":
            raise RuntimeError(f"adapter {a.name} failed to load: {mgr.get(a.name)['message']}")
        disk_s.append(mgr.get(a.name)["load_seconds"])
    register_adapters(engine, adapters[:16], [a.name for a in adapters[:16]])

    # host -> device: time each slot write; a step that wrote a slot is left out of the step samples
    writes: list[float] = []
    original_write = mgr.slots.write  # DeviceSlots.write: the copy into a slot, on the step thread

    def timed_write(slot, weights):
        t = time.perf_counter()
        original_write(slot, weights)
        writes.append(time.perf_counter() - t)

    mgr.slots.write = timed_write
    captured: list = []
    original_schedule = engine.scheduler.schedule

    def capture():
        batch = original_schedule()
        captured.append(_composition(batch) if batch else None)
        return batch

    engine.scheduler.schedule = capture

    rng = random.Random(seed)
    names = [a.name for a in adapters[:16]]
    samples = []
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    for trial in range(trials):
        rows = rng.choice([1, 2, 4, 8, 12, 16, 24, 32])
        distinct = rng.choice([d for d in (0, 1, 2, 4, 8, 16) if d <= rows])
        prompt_len = rng.choice([8, 16, 32, 64])
        extra, extra_len = rng.choice([(0, 0), (1, 32), (1, 128), (2, 64), (4, 64), (1, 384)])
        steps = rng.randint(4, 8)
        chosen = rng.sample(names, distinct) if distinct else []
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        for i in range(rows):
            prompt = [rng.randrange(10, 1000) for _ in range(prompt_len)]
            engine.add_request(f"t{trial}-{i}", prompt, params, chosen[i % distinct] if distinct else None)
        step_no = 0
        while engine.has_unfinished():
            if step_no == 2 and extra:
                for j in range(extra):
                    prompt = [rng.randrange(10, 1000) for _ in range(extra_len)]
                    engine.add_request(f"t{trial}-x{j}", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                                       chosen[j % distinct] if distinct else None)
            n_writes = len(writes)
            t = time.perf_counter()
            engine.step()
            seconds = time.perf_counter() - t
            comp = captured[-1] if captured else None
            if comp is not None and len(writes) == n_writes:
                samples.append([*comp, round(seconds, 6)])
            step_no += 1
        if trial % 20 == 19:
            log.info("%d/%d trials, %d step samples", trial + 1, trials, len(samples))
    elapsed = time.perf_counter() - t_start
    # more host -> device samples: rewrite slots with host copies (no sequence is running now)
    with mgr.lock:
        entries = [mgr.registry.get(a.name) for a in adapters[16:]]
        hosted = [e.weights for e in entries if e is not None and e.weights is not None]
        for i, weights in enumerate(hosted):
            t = time.perf_counter()
            original_write(i % mgr.num_slots, weights)
            writes.append(time.perf_counter() - t)
    return {
        "about": __doc__.split("\n\n")[0],
        "columns": ["rows", "decode_rows", "prefill_tokens", "distinct_adapters", "seconds"],
        "step_samples": samples,
        "disk_to_host_seconds": [round(s, 6) for s in disk_s],
        "host_to_device_seconds": [round(s, 6) for s in writes],
        "engine_start_seconds": round(engine_start, 3),
        "meta": {
            "model": model.label, "shape": model.shape, "adapter_rank": RANK, "adapter_targets": TARGETS,
            "adapter_bytes": adapters[0].nbytes, "torch_threads": 1, "dtype": "float32",
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
            "trials": trials, "seed": seed, "measure_seconds": round(elapsed, 1),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": _git_rev(),
        },
    }


def _git_rev() -> str:
    """The engine code the costs were measured on (they go stale when the hot path changes)."""
    import subprocess

    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "engine", "kernels"], cwd=root, capture_output=True,
                               text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def merge(old: dict, new: dict) -> dict:
    """Pool two runs of the same engine commit: their samples together, each run's meta kept."""
    if old["meta"].get("git") != new["meta"].get("git") or old["meta"].get("shape") != new["meta"].get("shape"):
        raise SystemExit(f"--append: the file was measured on {old['meta'].get('git')}, this run on "
                         f"{new['meta'].get('git')}; measure the new engine afresh")
    runs = old["meta"].get("runs") or [{**old["meta"], "engine_start_seconds": old.get("engine_start_seconds")}]
    runs = runs + [{**new["meta"], "engine_start_seconds": new.get("engine_start_seconds")}]
    out = dict(new)
    for key in ("step_samples", "disk_to_host_seconds", "host_to_device_seconds"):
        out[key] = old[key] + new[key]
    starts = sorted(r["engine_start_seconds"] for r in runs if r.get("engine_start_seconds") is not None)
    out["engine_start_seconds"] = starts[len(starts) // 2] if starts else None  # the median run's
    keep = ("load_average_before", "load_average_after", "trials", "seed", "measure_seconds", "when", "engine_start_seconds")
    out["meta"] = {**new["meta"], "runs": [{k: r.get(k) for k in keep} for r in runs],
                   "trials": sum(r["trials"] for r in runs), "measure_seconds": sum(r["measure_seconds"] for r in runs),
                   "load_average_before": min(r["load_average_before"] for r in runs),
                   "load_average_after": max(r["load_average_after"] for r in runs)}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_sim.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loraplex")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--trials", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", action="store_true", help="pool this run with the runs already in --out (same engine)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = measure(args.cache_dir, args.trials, args.seed)
    if args.append and args.out.is_file():
        result = merge(json.loads(args.out.read_text()), result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    log.info("%d step samples, %d disk loads, %d slot writes in %.0fs -> %s", len(result["step_samples"]),
             len(result["disk_to_host_seconds"]), len(result["host_to_device_seconds"]), result["meta"]["measure_seconds"],
             args.out)


if __name__ == "__main__":
    main()
