"""The Llama-family transformer (Llama 2/3, SmolLM2, Mistral, Qwen2) as plain PyTorch.

One forward runs a flattened mixed batch: prefill chunks and decode tokens of many sequences,
each row with its own LoRA adapter (or none). Module names mirror Hugging Face's so that
checkpoint keys load one to one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels.lora_ref import LoRABatch
from loraplex.kernels.ops import KernelOps
from loraplex.engine.model.attention import AttentionMetadata, paged_attention
from loraplex.engine.model.config import LORA_MODULES, ModelConfig
from loraplex.engine.model.rope import apply_rope, rope_cos_sin


@dataclass
class ForwardContext:
    """What every layer needs besides the hidden states; built once per step by the runner."""

    attn: AttentionMetadata
    lora: LoRABatch | None
    ops: KernelOps
    cos: torch.Tensor  # [T, head_dim] at each token's position
    sin: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LoRAProjection(nn.Module):
    """A linear layer plus stacked LoRA slots: y = W x + b + B_slot A_slot x per token.

    `lora_a[num_slots, max_rank, in]` and `lora_b[num_slots, out, max_rank]` are filled by the
    adapter manager; the scaling is folded into B, so the hook is one add.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, num_slots: int, max_rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, in_features), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, out_features, max_rank), persistent=False)
        # Per slot: does its adapter target this projection? The adapter manager keeps it. When no
        # segment's adapter does, the LoRA term is skipped: its zero weights would only add 0.
        self.slot_has_weights = [True] * num_slots

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        lora = ctx.lora
        if lora is not None and not lora.empty and any(self.slot_has_weights[seg[2]] for seg in lora.segments):
            ctx.ops.add_lora(y, x, self.lora_a, self.lora_b, lora)
        return y


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.scale = d ** -0.5
        proj = lambda i, o, b: LoRAProjection(i, o, b, num_slots, max_rank)  # noqa: E731
        self.q_proj = proj(h, cfg.num_heads * d, cfg.qkv_bias)
        self.k_proj = proj(h, cfg.num_kv_heads * d, cfg.qkv_bias)
        self.v_proj = proj(h, cfg.num_kv_heads * d, cfg.qkv_bias)
        self.o_proj = proj(cfg.num_heads * d, h, cfg.o_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rope(self.q_proj(x, ctx).view(t, self.num_heads, self.head_dim), ctx.cos, ctx.sin)
        k = apply_rope(self.k_proj(x, ctx).view(t, self.num_kv_heads, self.head_dim), ctx.cos, ctx.sin)
        v = self.v_proj(x, ctx).view(t, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache, ctx.attn, ctx.ops, self.scale)
        return self.o_proj(out.reshape(t, -1), ctx)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = LoRAProjection(h, i, b, num_slots, max_rank)
        self.up_proj = LoRAProjection(h, i, b, num_slots, max_rank)
        self.down_proj = LoRAProjection(i, h, b, num_slots, max_rank)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, ctx)) * self.up_proj(x, ctx), ctx)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int):
        super().__init__()
        self.self_attn = Attention(cfg, num_slots, max_rank)
        self.mlp = MLP(cfg, num_slots, max_rank)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, kv_cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class DecoderStack(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, num_slots, max_rank) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, num_lora_slots: int = 0, max_lora_rank: int = 0, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg, num_lora_slots, max_lora_rank)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions or cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def lora_projections(self):
        """(layer index, module name, projection) for every LoRA-targetable projection."""
        for i, layer in enumerate(self.model.layers):
            for name in LORA_MODULES:
                parent = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
                yield i, name, getattr(parent, name)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                lora: LoRABatch | None, ops: KernelOps, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Flattened tokens [T] -> final hidden states [T, hidden]."""
        ctx = ForwardContext(attn=attn, lora=lora, ops=ops, cos=self.rope_cos[positions], sin=self.rope_sin[positions])
        x = self.model.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, ctx, kv_cache)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
