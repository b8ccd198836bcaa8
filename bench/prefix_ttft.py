"""TTFT of a request whose long prefix is already in the prefix cache, against the first one.

    .venv/bin/python -m bench.prefix_ttft --cache-dir ~/.cache/loraplex   # SmolLM2-135M, 1,000 tokens
    .venv/bin/python -m bench.prefix_ttft --model-dir DIR                 # any checkpoint folder
    .venv/bin/python -m bench.prefix_ttft --quick                         # tiny random model, seconds

For each repeat, a fresh random prefix of --prefix-tokens tokens: request 1 is prefix + suffix A
(a cache miss, it computes the whole prompt), request 2 is prefix + suffix B (it computes only
the suffix and the part of the last block). Each asks for one token, so the time of its call is
its TTFT. The same pairs run on an engine with --no-enable-prefix-caching as the baseline for
request 2. Medians over the repeats; everything in one process, on one machine, in one run.
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
    p = argparse.ArgumentParser(prog="bench.prefix_ttft", description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None, help="where the SmolLM2 demo checkpoint lives (is built)")
    p.add_argument("--model-dir", type=Path, default=None, help="a checkpoint folder to use as it is (overrides --cache-dir)")
    p.add_argument("--quick", action="store_true", help="tiny random model: a smoke test, not a measurement")
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--suffix-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/prefix_ttft.json"))
    return p.parse_args(argv)


def ttft(engine, prompt: list[int]) -> float:
    from loraplex.engine.core.sampling_params import SamplingParams

    t0 = time.perf_counter()
    out = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))[0]
    assert out["finish_reason"] == "length" and out["error"] is None, out
    return time.perf_counter() - t0


def measure(model_dir: Path, on: bool, args, vocab: int) -> dict:
    from loraplex.engine.core.config import EngineConfig
    from loraplex.engine.core.llm_engine import LLMEngine

    max_len = args.prefix_tokens + args.suffix_tokens + 16
    engine = LLMEngine(EngineConfig(
        model_id=str(model_dir), device="cpu", num_threads=args.threads, enable_prefix_caching=on,
        max_model_len=max_len, max_num_seqs=4, max_num_batched_tokens=max(2048, max_len),
        num_kv_blocks=4 * -(-max_len // 16)))
    rng = random.Random(0)
    ttft(engine, [rng.randrange(vocab) for _ in range(32)])  # warm-up: first-call costs out of the way
    firsts, seconds = [], []
    for _ in range(args.repeats):
        prefix = [rng.randrange(vocab) for _ in range(args.prefix_tokens)]
        suffix_a = [rng.randrange(vocab) for _ in range(args.suffix_tokens)]
        suffix_b = [rng.randrange(vocab) for _ in range(args.suffix_tokens)]
        firsts.append(ttft(engine, prefix + suffix_a))
        seconds.append(ttft(engine, prefix + suffix_b))
    bm = engine.block_manager
    return {"prefix_caching": on, "first_ttft_s": firsts, "second_ttft_s": seconds,
            "first_ttft_median_s": statistics.median(firsts), "second_ttft_median_s": statistics.median(seconds),
            "prefix_cache_queries": bm.queries, "prefix_cache_hits": bm.hits}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from bench import assets

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="prefix-ttft-") as work:
        model = assets.chosen_model(args.model_dir, args.cache_dir, Path(work), args.quick)
        vocab = min(model.shape["vocab_size"], 50000)
        runs = [measure(model.path, on, args, vocab) for on in (True, False)]
    on, off = runs
    result = {
        "model": model.label, "model_source": model.source, "prefix_tokens": args.prefix_tokens,
        "suffix_tokens": args.suffix_tokens, "repeats": args.repeats, "threads": args.threads, "quick": args.quick,
        "runs": runs,
        # the headline: a cache hit against a miss on the same engine, and against no cache at all
        "speedup_second_vs_first": on["first_ttft_median_s"] / on["second_ttft_median_s"],
        "speedup_second_vs_no_cache": off["second_ttft_median_s"] / on["second_ttft_median_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"model: {model.label} ({model.source}); prefix {args.prefix_tokens} + suffix {args.suffix_tokens} tokens, "
          f"{args.repeats} repeats, {args.threads} thread(s)")
    print("| engine | request 1 TTFT (s) | request 2 TTFT (s) | hits / queries (tokens) |")
    print("|---|---|---|---|")
    for r in runs:
        print(f"| prefix caching {'on' if r['prefix_caching'] else 'off'} | {r['first_ttft_median_s']:.4f} | "
              f"{r['second_ttft_median_s']:.4f} | {r['prefix_cache_hits']} / {r['prefix_cache_queries']} |")
    print(f"request 2 vs request 1 (cache on): {result['speedup_second_vs_first']:.1f}x lower TTFT; "
          f"vs request 2 with the cache off: {result['speedup_second_vs_no_cache']:.1f}x")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
