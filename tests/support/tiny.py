"""Tiny random checkpoints and adapters, made by the tests themselves (no network here).

Each family differs where the engine must differ: Llama with Llama-3 rope scaling, Mistral,
Qwen2 with qkv bias and tied embeddings. The tokenizer is a byte-level BPE trained in-process.
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
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

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
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    tiny_tokenizer().save_pretrained(path)
    return path


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
