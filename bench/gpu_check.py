"""`make gpu-check`: everything a GPU day must prove, in one command (no network, no downloads).

    python -m bench.gpu_check --out DIR            # one NVIDIA GPU, torch + triton: < 8 minutes
    python -m bench.gpu_check --out DIR --quick    # CPU, tiny shapes, Triton interpreter: ~1 minute

1. Kernels: every Triton kernel against its torch reference at production shapes (Llama-3-8B:
   hidden 4096, 32 query / 8 KV heads, head_dim 128, intermediate 14336) in bf16 and fp16:
   the fused q/k/v and gate/up LoRA groups and o/down, mixed ranks 8/16/64 with adapter-less
   rows between segments; paged decode attention at GQA ratios 1, 4 and 7 with mixed context
   lengths; the fused-SDPA prefill path (first and later chunks).
2. Engine parity: a random-weight model of Llama-3-8B's shape with random PEFT adapters, greedy
   decoding of mixed-adapter batches through the Triton path (CUDA graphs included) and the
   torch path, in fp32 (both paths are IEEE fp32 there): the tokens must match.
3. Performance: the decode-step sweep (0/1/8/32/128 distinct adapters at batch 64 and 256) and
   prefill tokens/s in bf16, printed as a table and written as JSON to --out.
Exit status 0 only when every check passed. `--quick` runs the same code on the CPU with tiny
shapes (tests/bench/test_gpu_check_quick.py runs it in the suite, so it cannot rot).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Llama-3-8B's shape, and a tiny one for --quick.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rope_theta=10000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = {"float32": 1e-4, "float16": 3e-3, "bfloat16": 2.5e-2}
ATTN_TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- 1. kernels ------------------------------------------------------------------------------

def check_kernels(torch, device, quick: bool) -> list[dict]:
    from loraplex.kernels import attention_ref as AR
    from loraplex.kernels import lora_ref as LR
    from loraplex.kernels.lora_batch import LoRABatch, LoRASlots
    from loraplex.kernels import triton_attention as TA
    from loraplex.kernels import triton_lora as TL

    shape = TINY if quick else LLAMA3_8B
    h, i = shape["hidden_size"], shape["intermediate_size"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    dtypes = [torch.float16, torch.bfloat16]
    g = torch.Generator().manual_seed(0)
    rows = []

    def record(name, dtype, err, tol):
        ok = bool(err <= tol)
        rows.append({"check": name, "dtype": str(dtype).split(".")[-1], "max_err": float(err), "tol": tol, "ok": ok})
        log(f"kernel {name} {dtype}: max err {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAIL'}")

    # Mixed ranks, adapter-less rows before/between/after segments, 1-token segments, a long one.
    T = 40 if quick else 300
    segs = [(2, 5, 1, 8), (5, 6, 3, 16), (8, 8 + (T // 2), 0, 64), (T // 2 + 10, T // 2 + 11, 2, 8),
            (T // 2 + 12, T - 3, 4, 16)]
    batch = LoRABatch.build(segs, device)
    for dtype in dtypes:
        key = str(dtype).split(".")[-1]
        for name, d_in, outs in (("qkv", h, [q, kv, kv]), ("gate_up", h, [i, i]), ("o", q, [h]), ("down", i, [h])):
            a = [(torch.randn(6, 64, d_in, generator=g) / d_in ** 0.5) for _ in outs]
            b = [torch.randn(6, o, 64, generator=g) / 4 for o in outs]
            x = torch.randn(T, d_in, generator=g)
            ys = [torch.randn(T, o, generator=g) for o in outs]
            slots = LoRASlots.from_peft([t.to(dtype).to(device) for t in a], [t.to(dtype).to(device) for t in b])
            oracle = LR.add_lora_ref([y.to(dtype).double().to(device) for y in ys], x.to(dtype).double().to(device),
                                     LoRASlots(slots.a.double(), [t.double() for t in slots.b]), batch)
            got = TL.add_lora_triton([y.to(dtype).to(device) for y in ys], x.to(dtype).to(device), slots, batch)
            err = max(((gy.double() - oy).abs() / (1 + oy.abs())).max().item() for gy, oy in zip(got, oracle))
            record(f"lora {name} (P={len(outs)})", dtype, err, TOL[key])
        # paged decode attention, GQA 1, 4 and 7; context lengths mixed around block edges
        for heads, kvh in ((8, 8), (32, 8), (28, 4)) if not quick else ((4, 4), (8, 2)):
            lens = [1, 15, 16, 17, 100, 333] if quick else [1, 17, 128, 1000, 2048, 4095] * 8
            bs = 16
            nbs = [-(-n // bs) for n in lens]
            total = sum(nbs) + 2
            kc = torch.randn(total, bs, kvh, d, generator=g).to(dtype).to(device)
            vc = torch.randn(total, bs, kvh, d, generator=g).to(dtype).to(device)
            qq = torch.randn(len(lens), heads, d, generator=g).to(dtype).to(device)
            perm = torch.randperm(total, generator=g)
            tables = torch.zeros(len(lens), max(nbs), dtype=torch.int32)
            at = 0
            for r, nb in enumerate(nbs):
                tables[r, :nb] = perm[at:at + nb]
                at += nb
            tables, ctx = tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
            got = TA.paged_decode_attention_triton(qq, kc, vc, tables, ctx, d ** -0.5)
            want = AR.paged_decode_attention_ref(qq.float(), kc.float(), vc.float(), tables, ctx, d ** -0.5)
            err = ((got.float() - want).abs() / (1 + want.abs())).max().item()
            record(f"decode attention H{heads}/KV{kvh}", dtype, err, ATTN_TOL[key])
            # the prefill path on the same cache: a first chunk and a later chunk
            for n, context in ((64, 64), (32, 333)) if quick else ((512, 512), (256, 2048)):
                table = tables[lens.index(max(lens))]
                qp = torch.randn(n, heads, d, generator=g).to(dtype).to(device)
                got = AR.paged_prefill_attention_sdpa(qp, kc, vc, table, context, d ** -0.5)
                want = AR.paged_prefill_attention_ref(qp.float(), kc.float(), vc.float(), table, context, d ** -0.5)
                err = ((got.float() - want).abs() / (1 + want.abs())).max().item()
                record(f"prefill sdpa H{heads}/KV{kvh} n={n} ctx={context}", dtype, err, ATTN_TOL[key])
    return rows


# ---- assets: a random checkpoint and random PEFT adapters, written here -------------------------

def write_random_model(torch, path: Path, shape: dict, device) -> Path:
    """A random Llama of `shape` as bf16 safetensors shards + config + tokenizer, generated on
    `device` (no fp32 copy of an 8B model on the host)."""
    from safetensors.torch import save_file

    from bench.assets import _tokenizer
    from loraplex.engine.model.config import ModelConfig
    from loraplex.engine.model.llama import LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(shape, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
               torch_dtype="bfloat16", bos_token_id=0, eos_token_id=0)
    (path / "config.json").write_text(json.dumps(cfg))
    _tokenizer(shape["vocab_size"]).save_pretrained(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelConfig.from_dict(cfg))
    gen = torch.Generator(device=device).manual_seed(0)
    shard, shard_bytes, index, n = {}, 0, {}, 0
    for name, p in model.named_parameters():
        if p.dim() == 1:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            std = 1.0 if "embed" in name else 0.02
            t = (torch.randn(p.shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()
        shard[name] = t
        shard_bytes += t.numel() * 2
        if shard_bytes > 2 << 30:
            n += 1
            save_file(shard, path / f"model-{n:05d}.safetensors")
            index.update({k: f"model-{n:05d}.safetensors" for k in shard})
            shard, shard_bytes = {}, 0
    if shard:
        n += 1
        save_file(shard, path / f"model-{n:05d}.safetensors")
        index.update({k: f"model-{n:05d}.safetensors" for k in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return path


def write_random_adapters(torch, out: Path, shape: dict, count: int, ranks: list[int], targets: list[str]):
    """`count` PEFT LoRA checkpoints (adapter_config.json + adapter_model.safetensors, PEFT's
    key names) with random non-zero A and B."""
    from safetensors.torch import save_file

    from bench.assets import AdapterInfo, adapter_nbytes

    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    io = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
          "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    g = torch.Generator().manual_seed(1)
    infos = []
    for a in range(count):
        r = ranks[a % len(ranks)]
        path = out / f"lora-{a:04d}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(layers):
            for m in targets:
                fin, fout = io[m]
                part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{m}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(r, fin, generator=g) / fin ** 0.5).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(fout, r, generator=g) * (0.5 / r) ** 0.5).to(torch.bfloat16)
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets, "lora_dropout": 0.0,
            "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "random"}))
        infos.append(AdapterInfo(path.name, path, r, adapter_nbytes(shape, r, targets, elem=2)))
    return infos


def make_engine(model_dir: Path, adapter_dir: Path, device: str, dtype: str, max_num_seqs: int, max_model_len: int,
                max_adapters: int, max_rank: int, num_blocks: int | None = None):
    from loraplex.engine.core.config import EngineConfig
    from loraplex.engine.core.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(
        model_id=str(model_dir), device=device, dtype=dtype, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(2048, max_num_seqs * 16), max_model_len=max_model_len,
        num_kv_blocks=num_blocks, max_active_adapters=max_adapters + 1, max_cpu_adapters=max_adapters + 8,
        max_lora_rank=max_rank, adapter_dir=str(adapter_dir), max_waiting=100000))


# ---- 2. engine parity ------------------------------------------------------------------------

def check_parity(torch, engine, adapters, quick: bool) -> dict:
    """Greedy tokens of a mixed-adapter batch, Triton path (with CUDA graphs where they exist)
    against the torch path, on the same engine and weights."""
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.kernels.ops import TORCH_OPS

    runner = engine.runner
    assert runner.ops.name == "triton", f"the engine runs the {runner.ops.name} kernels, not triton"
    vocab = engine.model_config.vocab_size
    n = 4 if quick else 12
    prompts = [[(37 * r + 11 * j) % (vocab - 10) + 5 for j in range(5 + 7 * r)] for r in range(n)]
    names = [a.name for a in adapters] + [None]
    which = [names[r % len(names)] for r in range(n)]
    params = SamplingParams(max_tokens=5 if quick else 24, temperature=0.0, ignore_eos=True)
    triton_out = [r["token_ids"] for r in engine.generate(prompts, params, which)]
    ops, graphs = runner.ops, runner.graphs
    runner.ops, runner.graphs = TORCH_OPS, None
    try:
        torch_out = [r["token_ids"] for r in engine.generate(prompts, params, which)]
    finally:
        runner.ops, runner.graphs = ops, graphs
    same = sum(a == b for a, b in zip(triton_out, torch_out))
    ok = same == n
    log(f"engine parity: {same}/{n} sequences identical over {params.max_tokens} greedy tokens "
        f"({'with' if graphs is not None else 'without'} CUDA graphs) {'ok' if ok else 'FAIL'}")
    return {"sequences": n, "identical": same, "tokens": params.max_tokens, "cuda_graphs": graphs is not None, "ok": ok,
            "first_mismatch": next(({"row": r, "triton": a, "torch": b} for r, (a, b) in
                                    enumerate(zip(triton_out, torch_out)) if a != b), None)}


# ---- 3. performance --------------------------------------------------------------------------

def sweep(torch, engine, adapters, batches: list[int], distinct: list[int], steps: int) -> list[dict]:
    from bench.stepbench import engine_decode_steps

    names = [a.name for a in adapters]
    rows = []
    for b in batches:
        base = None
        for d in [x for x in distinct if x <= min(b, len(names))]:
            ms = engine_decode_steps(engine, b, names[:d], prompt_len=16, steps=steps)
            base = ms if d == 0 else base
            rows.append({"batch": b, "distinct": d, "step_ms": ms, "tok_s": 1000 * b / ms,
                         "ratio_vs_none": (base / ms) if base else None})
            log(f"decode batch {b}, {d} distinct adapters: {ms:.2f} ms/step, {1000 * b / ms:.0f} tok/s")
    return rows


def prefill_tok_s(torch, engine, num: int, length: int) -> float:
    from loraplex.engine.core.sampling_params import SamplingParams

    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prompts = [[(13 * r + j) % (vocab - 10) + 5 for j in range(length)] for r in range(num)]
    engine.generate(prompts[:2], params)  # warm
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    engine.generate(prompts, params)
    sync()
    return num * length / (time.perf_counter() - t)


def table(rows: list[dict]) -> str:
    out = ["| batch | distinct adapters | step ms | tok/s | ratio vs no adapter |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ratio_vs_none']:.3f}" if r["ratio_vs_none"] else "–"
        out.append(f"| {r['batch']} | {r['distinct']} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {ratio} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    ap.add_argument("--quick", action="store_true", help="CPU, tiny shapes, Triton interpreter (the CI mode)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the random model and adapters")
    args = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("gpu-check needs a CUDA device (or --quick for the CPU mode)", file=sys.stderr)
        return 2
    if not cuda:
        # The interpreter must be chosen before the kernels are defined; ops.py does the same.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)
    os.environ["LORAPLEX_KERNELS"] = "triton"
    device = "cuda" if cuda else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    t0 = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (quick)", "quick": args.quick,
                    "torch": torch.__version__}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError as exc:
        print(f"gpu-check needs triton: {exc}", file=sys.stderr)
        return 2

    result["kernels"] = check_kernels(torch, device, args.quick)
    shape = TINY if args.quick else LLAMA3_8B
    model_dir = write_random_model(torch, work / "model", shape, device)
    n_adapters = 4 if args.quick else 128
    adapters = write_random_adapters(torch, work / "adapters", shape, n_adapters, [8, 16],
                                     TARGETS if args.quick else TARGETS[:4])
    log(f"random model and {n_adapters} adapters written in {time.perf_counter() - t0:.0f}s")

    from bench.systems import register_adapters

    # 2. parity in fp32 (IEEE on both paths), with a few adapters
    eng = make_engine(model_dir, work / "adapters", device, "float32", 16, 256, 4, 16)
    register_adapters(eng, adapters[:3], [a.name for a in adapters[:3]])
    result["parity"] = check_parity(torch, eng, adapters[:3], args.quick)
    del eng
    if cuda:
        torch.cuda.empty_cache()

    # 3. the sweep and prefill in bf16
    batches, distinct = ([2, 4], [0, 1, 2]) if args.quick else ([64, 256], [0, 1, 8, 32, 128])
    eng = make_engine(model_dir, work / "adapters", device, "bfloat16", max(batches), 128, len(adapters), 16,
                      num_blocks=None if cuda else 128)
    register_adapters(eng, adapters, [a.name for a in adapters])
    if not cuda:  # the interpreter measures nothing: the quick mode runs the sweep's code on torch
        from loraplex.kernels.ops import TORCH_OPS
        eng.runner.ops = TORCH_OPS
    result["decode_sweep"] = sweep(torch, eng, adapters, batches, distinct, steps=3 if args.quick else 10)
    result["prefill_tok_s"] = prefill_tok_s(torch, eng, 2 if args.quick else 16, 32 if args.quick else 512)
    log(f"prefill: {result['prefill_tok_s']:.0f} tok/s")
    del eng

    result["seconds"] = time.perf_counter() - t0
    result["ok"] = all(r["ok"] for r in result["kernels"]) and result["parity"]["ok"]
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print("\n## Decode step sweep (" + result["device"] + ", bf16)\n\n" + table(result["decode_sweep"]))
    print(f"\nprefill: {result['prefill_tok_s']:.0f} tok/s; kernels "
          f"{sum(r['ok'] for r in result['kernels'])}/{len(result['kernels'])} ok; parity "
          f"{'ok' if result['parity']['ok'] else 'FAIL'}; {result['seconds']:.0f}s; JSON: {args.out / 'gpu_check.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
