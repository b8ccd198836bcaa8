"""Decode step time under tensor parallelism: --tensor-parallel-size 1 against 2 on one machine,
in one run (CPU: gloo, one torch thread per rank).

    .venv/bin/python -m bench.tp_step               # random ~0.5 B Llama (assets.LARGE_SHAPE), batch 8
    .venv/bin/python -m bench.tp_step --quick       # tiny random model: a smoke test, not a measurement

Each size serves the same batch: --batch requests of --prompt-tokens random token ids, half of
them with one all-linear rank-16 adapter (so the sharded LoRA path is in the step), greedy,
--steps new tokens each. The steps after every request has its first token are decode-only; the
median of their wall times is the figure. The greedy tokens of every size must equal size 1's:
the run fails otherwise. On the CPU, tensor parallelism trades one process's matmuls for
N processes' smaller ones plus 2 all-reduces per layer over loopback; the ratio says which wins
for this shape on this machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.tp_step", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model: a smoke test, not a measurement")
    p.add_argument("--sizes", default="1,2", help="tensor-parallel sizes to run; the first is the baseline")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/tp_step.json"))
    return p.parse_args(argv)


def measure(model_dir: Path, adapter_root: Path, adapter: str, size: int, args, vocab: int) -> dict:
    from loraplex.engine.core.config import EngineConfig
    from loraplex.engine.core.llm_engine import LLMEngine
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.manifest import AdapterManifest

    max_len = args.prompt_tokens + args.steps + 8
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model_id=str(model_dir), device="cpu", num_threads=args.threads, tensor_parallel_size=size,
        max_model_len=max_len, max_num_seqs=args.batch, max_num_batched_tokens=max(2048, args.batch * max_len),
        num_kv_blocks=args.batch * -(-max_len // 16) + 4, adapter_dir=str(adapter_root)))
    start_s = time.perf_counter() - t0
    try:
        engine.adapters.register(AdapterManifest(name=adapter, source="local", uri=adapter))
        params = SamplingParams(max_tokens=args.steps, temperature=0, ignore_eos=True)
        engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=2, temperature=0), [adapter])  # warm-up, loads it
        rng = random.Random(0)
        ids = []
        for i in range(args.batch):
            rid = f"r{i}"
            engine.add_request(rid, [rng.randrange(vocab) for _ in range(args.prompt_tokens)], params,
                               adapter if i % 2 else None)
            ids.append(rid)
        tokens: dict[str, list[int]] = {r: [] for r in ids}
        decode_s = []
        while engine.has_unfinished():
            all_started = all(tokens[r] for r in ids)
            t = time.perf_counter()
            outputs = engine.step()
            if all_started:
                decode_s.append(time.perf_counter() - t)
            for out in outputs:
                tokens[out.request_id] += out.new_token_ids
        return {"tensor_parallel_size": size, "start_s": start_s, "decode_steps": len(decode_s),
                "decode_step_median_ms": 1000 * statistics.median(decode_s),
                "tokens": [tokens[r] for r in ids]}
    finally:
        engine.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from bench import assets

    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="tp-step-") as work:
        model = assets.large_model(Path(work), args.quick)
        (lora,) = assets.make_adapters(model, Path(work) / "adapters", 1, [16], list(assets.ALL_LINEAR))
        vocab = min(model.shape["vocab_size"], 50000)
        runs = [measure(model.path, Path(work) / "adapters", lora.name, n, args, vocab) for n in sizes]
    base = runs[0]
    for r in runs[1:]:
        if r["tokens"] != base["tokens"]:
            raise SystemExit(f"greedy tokens of size {r['tensor_parallel_size']} differ from size {sizes[0]}'s")
    result = {"model": model.label, "quick": args.quick, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
              "steps": args.steps, "threads_per_rank": args.threads,
              "runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs], "tokens_equal": True,
              "step_time_ratio_vs_first": {r["tensor_parallel_size"]: r["decode_step_median_ms"] / base["decode_step_median_ms"]
                                           for r in runs}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"model: {model.label}; batch {args.batch} (half on a rank-16 all-linear adapter), {args.threads} thread(s) per rank")
    print("| tensor-parallel size | start (s) | decode step median (ms) | vs size %d |" % sizes[0])
    print("|---|---|---|---|")
    for r in runs:
        print(f"| {r['tensor_parallel_size']} | {r['start_s']:.1f} | {r['decode_step_median_ms']:.1f} | "
              f"{result['step_time_ratio_vs_first'][r['tensor_parallel_size']]:.2f} |")
    print(f"greedy tokens equal across sizes; written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
