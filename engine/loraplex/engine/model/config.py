"""The subset of a Hugging Face `config.json` that the engine's model needs, validated at startup."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Architectures whose layers are the Llama block (RMSNorm, RoPE, GQA attention, gated MLP).
# Llama, Mistral and Qwen2 differ only in config (biases, tied embeddings, rope scaling, windows);
# the other families have a few quirks each, named by the `ModelConfig` fields below the line
# and set by the family's entry in FAMILY_QUIRKS.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM")
ROPE_TYPES = ("default", "llama3", "linear", "longrope")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


class UnsupportedModelError(ValueError):
    """The checkpoint is not one the engine can serve; the message says why."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    # Per layer: the sliding window (a token attends to itself and the window - 1 before it),
    # or None for full attention. Honoured by the paged attention; every token's KV is kept.
    layer_windows: tuple[int | None, ...] = ()
    # ---- family quirks (the defaults are Llama's) ----
    hidden_act: str = "silu"  # the gated MLP's activation; Gemma: gelu_pytorch_tanh
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMSNorm over each head of q and k, before RoPE
    norm_weight_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + weight)
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False  # Gemma 2/3: a norm on the attention output and around the MLP
    attn_scale: float | None = None  # Gemma: query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5)
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2: the same on the output logits
    local_rope_theta: float | None = None  # Gemma 3: the sliding layers' own RoPE (None: as the others)
    local_rope_scaling: dict | None = None
    fused_projections: bool = False  # Phi-3: the checkpoint holds qkv_proj and gate_up_proj
    num_experts: int = 0  # Mixtral: the MLP is a sparse mixture of this many SwiGLU experts
    # A quantized base: HF's block-wise fp8 (`quant_method: fp8`), the block [out, in] of one scale.
    fp8_block: tuple[int, int] | None = None
    experts_per_token: int = 0  # ... of which the router picks this many per token
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "<none>")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r}; loraplex serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported activation {act!r}; supported: {', '.join(ACTIVATIONS)}")
        if float((cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
        rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if "full_attention" in rope_params:  # Gemma 3: one RoPE per layer type
            rope_theta, rope_scaling = _rope(rope_params["full_attention"], cfg)
            local_rope = _rope(rope_params.get("sliding_attention") or rope_params["full_attention"], cfg)
        else:
            rope_theta, rope_scaling = _rope(rope_params, cfg)
            local_rope = None
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        is_qwen2 = arch == "Qwen2ForCausalLM"
        base = dict(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=is_qwen2 or cfg.get("attention_bias", False),
            o_bias=(not is_qwen2) and cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            layer_windows=_layer_windows(cfg),
            hidden_act=act,
            raw=cfg,
        )
        if local_rope is not None and local_rope != (rope_theta, rope_scaling):
            base["local_rope_theta"], base["local_rope_scaling"] = local_rope
        base.update(FAMILY_QUIRKS.get(arch, lambda c: {})(cfg))
        base["fp8_block"] = _fp8_block(cfg.get("quantization_config"))
        if base["fp8_block"] and base.get("fused_projections"):
            raise UnsupportedModelError("fp8 weights of fused projections (qkv_proj, gate_up_proj) are not supported")
        return cls(**base)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UnsupportedModelError(f"{model_dir} has no config.json")
        return cls.from_dict(json.loads(path.read_text()))

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable projection."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        attention = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.num_experts:  # Mixtral: LoRA on attention only (the experts are not LoRA targets)
            return attention
        return {**attention, "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def fused_modules(self) -> dict[str, tuple[str, ...]]:
        """Checkpoint modules that hold several of the engine's projections, stacked by rows in
        this order (Phi-3's qkv_proj and gate_up_proj). The loader splits base weights by rows;
        a PEFT adapter on a fused module keeps its A and splits its B the same way."""
        if not self.fused_projections:
            return {}
        return {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _rope(params: dict, cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling or None) from transformers >= 5's `rope_parameters` (or an older file's
    top-level `rope_theta` + `rope_scaling`), checked against the scalings rope.py implements."""
    rope = dict(params)
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "longrope":  # Phi-3: also needs the training length and the target length
        rope.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        rope.setdefault("max_position_embeddings", cfg.get("max_position_embeddings"))
        rope["rope_type"] = "longrope"
    return theta, (rope if rope_type != "default" else None)


def _layer_windows(cfg: dict) -> tuple[int | None, ...]:
    """Sliding windows per layer: `layer_types` where the file has them (Gemma 2/3, Qwen2/3 in
    transformers >= 5), else the one `sliding_window` on every layer (Mistral, Phi-3)."""
    window = cfg.get("sliding_window")
    n = cfg["num_hidden_layers"]
    if not window or cfg.get("use_sliding_window") is False:
        return (None,) * n
    types = cfg.get("layer_types") or ["sliding_attention"] * n
    return tuple(window if t == "sliding_attention" else None for t in types)


def _fp8_block(quant: dict | None) -> tuple[int, int] | None:
    """The one quantized format served: HF fp8 with block-wise weight scales (Qwen3-FP8,
    DeepSeek-V3). Weights are dequantized for the matmul; activations stay in the compute dtype."""
    if not quant:
        return None
    method = quant.get("quant_method")
    block = quant.get("weight_block_size")
    if method != "fp8":
        raise UnsupportedModelError(f"unsupported quantization {method!r}; loraplex serves block-wise fp8 (quant_method fp8)")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UnsupportedModelError(f"fp8 checkpoints need weight_block_size [out, in]; got {block!r} (per-tensor fp8 is not supported)")
    return (block[0], block[1])


def _gemma(cfg: dict) -> dict:
    scalar = cfg.get("query_pre_attn_scalar")
    return dict(norm_weight_offset=1.0, embed_scale=cfg["hidden_size"] ** 0.5, sandwich_norms=True,
                attn_scale=scalar ** -0.5 if scalar else None, attn_logit_softcap=cfg.get("attn_logit_softcapping"),
                final_logit_softcap=cfg.get("final_logit_softcapping"))


FAMILY_QUIRKS = {
    "Qwen3ForCausalLM": lambda cfg: dict(qk_norm=True),
    "Gemma2ForCausalLM": _gemma,
    "Gemma3ForCausalLM": lambda cfg: dict(_gemma(cfg), qk_norm=True),
    "Phi3ForCausalLM": lambda cfg: dict(fused_projections=True),
    "MixtralForCausalLM": lambda cfg: dict(num_experts=cfg["num_local_experts"], experts_per_token=cfg["num_experts_per_tok"]),
}


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
