"""Time per output token with and without a JSON-schema grammar, on one engine, in one run.

    .venv/bin/python -m bench.structured_tpot --cache-dir ~/.cache/loraplex   # SmolLM2-135M (49k vocab)
    .venv/bin/python -m bench.structured_tpot --model-dir DIR                 # any checkpoint folder
    .venv/bin/python -m bench.structured_tpot --quick                         # tiny random model, seconds

For each batch size, the same prompts decode --tokens tokens three ways, interleaved over
--repeats rounds: no grammar; every row under a JSON schema; half the rows under it (a mixed
batch). The schema asks for a long array of objects, so that no row finishes before --tokens.
A step's time is measured around `LLMEngine.step()`; the prefill step is left out. TPOT = the
median decode step time (each step makes one token per row). Overhead = grammar TPOT / plain TPOT - 1.
Times are the step thread's CPU time (time.thread_time; torch runs on that thread with
--threads 1), which a shared, oversubscribed machine distorts far less than wall time; wall-time
medians are reported next to them. Because whole-step times of separate runs still drift on a
shared machine, the grammar's own cost is also timed inside the step (the CPU time of the
grammar-mask stage of logits_processors, per step) and reported as a share of the plain TPOT.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 200, "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["name", "age", "city"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.structured_tpot", description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None, help="where the SmolLM2 demo checkpoint lives (is built)")
    p.add_argument("--model-dir", type=Path, default=None, help="a checkpoint folder to use as it is (overrides --cache-dir)")
    p.add_argument("--quick", action="store_true", help="tiny random model: a smoke test, not a measurement")
    p.add_argument("--batch-sizes", default="1,8,16")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/structured_tpot.json"))
    return p.parse_args(argv)


def decode_step_times(engine, prompts: list[str], params: list) -> list[tuple[float, float]]:
    """Run the requests to the end; (CPU, wall) seconds of each step after the first (the prefill)."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, p)
    times = []
    first = True
    while engine.has_unfinished():
        c0, w0 = time.thread_time(), time.perf_counter()
        engine.step()
        if not first:
            times.append((time.thread_time() - c0, time.perf_counter() - w0))
        first = False
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from bench import assets
    from loraplex.engine.core.config import EngineConfig
    from loraplex.engine.core.llm_engine import LLMEngine
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.engine.core.grammar_compiler import GrammarCompiler
    from loraplex.engine.core.structured_output import GrammarSpec

    torch.set_num_threads(args.threads)
    from loraplex.engine.core import logits_processors

    mask_times: list[float] = []  # CPU seconds of each step's grammar-mask stage
    grammar_masks = logits_processors._grammar_masks

    def timed_grammar_masks(logits, seqs):
        t0 = time.thread_time()
        grammar_masks(logits, seqs)
        if any(s.params.grammar is not None for s in seqs):
            mask_times.append(time.thread_time() - t0)

    logits_processors._grammar_masks = timed_grammar_masks
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="structured-tpot-") as work:
        model = assets.chosen_model(args.model_dir, args.cache_dir, Path(work), args.quick)
        engine = LLMEngine(EngineConfig(model_id=str(model.path), device="cpu", num_threads=args.threads,
                                        max_model_len=512, max_num_seqs=max(batch_sizes),
                                        num_kv_blocks=max(batch_sizes) * 512 // 16 + 16))
        compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
        t0 = time.perf_counter()
        grammar = compiler.compile(GrammarSpec.json_schema(SCHEMA))
        compile_s = time.perf_counter() - t0

        def params(constrained: bool) -> SamplingParams:
            return SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=1, ignore_eos=True,
                                  grammar=grammar.matcher() if constrained else None)

        prompt = "Write a JSON list of people with their name, age and city:"
        decode_step_times(engine, [prompt], [params(False)])  # warm-up
        rows = []
        for b in batch_sizes:
            runs: dict[str, list[tuple[float, float]]] = {"plain": [], "grammar": [], "mixed": []}
            all_rows_masks: list[float] = []
            for _ in range(args.repeats):
                runs["plain"] += decode_step_times(engine, [prompt] * b, [params(False) for _ in range(b)])
                mask_times.clear()
                runs["grammar"] += decode_step_times(engine, [prompt] * b, [params(True) for _ in range(b)])
                all_rows_masks += mask_times[1:]  # the first is the prefill step's
                runs["mixed"] += decode_step_times(engine, [prompt] * b, [params(i % 2 == 0) for i in range(b)])
            tpot = {k: statistics.median(c for c, _ in v) for k, v in runs.items()}
            wall = {k: statistics.median(w for _, w in v) for k, v in runs.items()}
            rows.append({"batch": b, "tpot_plain_s": tpot["plain"], "tpot_grammar_s": tpot["grammar"],
                         "tpot_mixed_s": tpot["mixed"], "wall_tpot_s": wall,
                         "steps": {k: len(v) for k, v in runs.items()},
                         "mask_cpu_per_step_s": statistics.median(all_rows_masks),
                         "mask_share_of_plain_tpot": statistics.median(all_rows_masks) / tpot["plain"],
                         "overhead_grammar": tpot["grammar"] / tpot["plain"] - 1,
                         "overhead_mixed": tpot["mixed"] / tpot["plain"] - 1})
    result = {"model": model.label, "model_source": model.source, "vocab_size": engine.model_config.vocab_size,
              "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads, "quick": args.quick,
              "schema_compile_s": compile_s, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"model: {model.label} ({model.source}), vocab {result['vocab_size']}; {args.tokens} tokens, "
          f"{args.repeats} repeats, {args.threads} thread(s); schema compile {compile_s * 1e3:.1f} ms")
    print("CPU-time TPOT (ms) [wall-time medians in brackets]")
    print("| batch | plain | all rows JSON schema | overhead | half the rows | overhead | grammar-mask stage, all rows |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        w = r["wall_tpot_s"]
        print(f"| {r['batch']} | {r['tpot_plain_s'] * 1e3:.2f} [{w['plain'] * 1e3:.1f}] | "
              f"{r['tpot_grammar_s'] * 1e3:.2f} [{w['grammar'] * 1e3:.1f}] | {r['overhead_grammar'] * 100:+.1f}% | "
              f"{r['tpot_mixed_s'] * 1e3:.2f} [{w['mixed'] * 1e3:.1f}] | {r['overhead_mixed'] * 100:+.1f}% | "
              f"{r['mask_cpu_per_step_s'] * 1e3:.2f} ms = {r['mask_share_of_plain_tpot'] * 100:.1f}% of plain |")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
