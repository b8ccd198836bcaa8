"""Tiny random checkpoints and adapters, made in-process (no network here): the tests' models,
and the default model of the benchmarks that measure the serving path rather than the model
(bench.adminbench, bench.tracing_overhead). One copy for both, in bench/ so that the benchmarks
never import the tests.

Each family differs where the engine must differ: Llama with Llama-3 rope scaling, Mistral,
Qwen2 with qkv bias and tied embeddings, and the families with quirks (see tiny_config). The tokenizer is a byte-level BPE trained in-process.
"""
from __future__ import annotations

import functools
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "LoRA adapters share one base model; the KV cache is paged in blocks.",
    "Continuous batching admits new requests at every step of the scheduler.",
    "0123456789 {\"answer\": true} [list, of, things] - + * / = ? !",
] * 20


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str = "llama", **overrides):
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    tok = tiny_tokenizer()
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    if family == "llama":
        cfg = LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif family == "mistral":
        cfg = MistralConfig(**common, rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)
    elif family == "qwen3":  # q/k norm, head_dim set apart from hidden / heads
        cfg = Qwen3Config(**common, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=False)
    elif family == "gemma2":  # soft-capping, sliding/full layers, (1 + w) norms, sandwich norms, scaled embeddings
        cfg = Gemma2Config(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                           attn_logit_softcapping=5.0, final_logit_softcapping=30.0, pad_token_id=tok.pad_token_id)
    elif family == "gemma3":  # q/k norm, per-layer-type RoPE (linear scaling on the full layers)
        cfg = Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                               layer_types=["sliding_attention", "full_attention"], pad_token_id=tok.pad_token_id,
                               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    elif family == "phi3":  # fused qkv_proj / gate_up_proj, LongRoPE (short set within 128), a window on every layer
        half = 16 // 2
        cfg = Phi3Config(**common, pad_token_id=tok.pad_token_id, original_max_position_embeddings=128, sliding_window=24,
                         rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                       "long_factor": [1.0 + 0.9 * i for i in range(half)]})
    elif family == "mixtral":  # sparse MoE MLP: 4 experts, top 2
        cfg = MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, pad_token_id=tok.pad_token_id,
                            tie_word_embeddings=False)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_checkpoint(path: str | Path, family: str = "llama", seed: int = 0,
                         max_shard_size: str | None = None, **overrides) -> Path:
    """Save a random tiny model of `family` (plus tokenizer) as a HF folder; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), torch_dtype=torch.float32)
    # Random init has tiny weights that make every logit equal; widen them so greedy
    # decoding actually depends on the numbers the engine computes.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08 if "embed" not in name else 1.0)
            elif "bias" in name:
                p.normal_(0, 0.05)
            elif "norm" in name and family in NEW_FAMILIES:  # so that (1 + w) vs w, q/k norms matter
                p.add_(torch.randn_like(p) * 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tiny_tokenizer().save_pretrained(path)
    return path


NEW_FAMILIES = ("qwen3", "gemma2", "gemma3", "phi3", "mixtral")
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_tiny_adapter(base_dir: str | Path, out_dir: str | Path, rank: int = 8, alpha: float = 16,
                      target_modules: list[str] | None = None, seed: int = 1, use_rslora: bool = False,
                      rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                      scale_b: float = 0.5, **extra) -> Path:
    """A PEFT LoRA adapter for `base_dir` with random (non-zero) A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules or ["q_proj", "v_proj"],
                     use_rslora=use_rslora, rank_pattern=rank_pattern or {},
                     alpha_pattern=alpha_pattern or {}, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM", **extra)
    model = get_peft_model(base, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.normal_(0, 0.3)
            elif "lora_B" in name:
                p.normal_(0, scale_b)
    model.save_pretrained(out_dir)
    return out_dir



def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte-to-unicode map: how a byte-level BPE vocabulary spells each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def with_token_text(checkpoint: str | Path, out_dir: str | Path, token_id: int, raw: bytes) -> Path:
    """A copy of a tiny checkpoint whose tokenizer decodes `token_id` to the bytes `raw`.

    Crafted tokens reproduce text-handling defects that a random model only hits by chance:
    a token holding a long whitespace run, or a lone lead byte of a multi-byte character.
    The merges are dropped (prompts then encode byte by byte, which the model does not mind);
    pass prompts as token ids to keep them identical to the original tokenizer's."""
    import json
    import shutil

    out_dir = Path(out_dir)
    shutil.copytree(checkpoint, out_dir)
    path = out_dir / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    table = _byte_spelling()
    spelled = "".join(table[b] for b in raw)
    old = next(s for s, i in vocab.items() if i == token_id)
    if spelled in vocab:  # swap the two entries so that every id keeps a spelling
        vocab[old], vocab[spelled] = vocab[spelled], token_id
    else:
        del vocab[old]
        vocab[spelled] = token_id
    spec["model"]["merges"] = []
    path.write_text(json.dumps(spec))
    return out_dir


FP8_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_tiny_fp8_checkpoint(src: str | Path, out: str | Path, reference: str | Path, block=(32, 32)) -> Path:
    """Quantize `src`'s projections to HF block-wise fp8 (`quant_method: fp8`) into `out`, and
    write the dequantized weights as a plain checkpoint into `reference` (the oracle)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from loraplex.kernels.fp8_ref import dequantize_fp8_blockwise_ref, quantize_fp8_blockwise_ref

    src, out, reference = Path(src), Path(out), Path(reference)
    for d in (out, reference):
        shutil.copytree(src, d, dirs_exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    quantized, dequantized = {}, {}
    for key, t in tensors.items():
        if key.endswith(".weight") and key.split(".")[-2] in FP8_TARGETS:
            q, scale_inv = quantize_fp8_blockwise_ref(t, block)
            quantized[key], quantized[key.removesuffix("weight") + "weight_scale_inv"] = q, scale_inv
            dequantized[key] = dequantize_fp8_blockwise_ref(q, scale_inv, block, torch.float32)
        else:
            quantized[key] = dequantized[key] = t
    save_file(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file(dequantized, str(reference / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
