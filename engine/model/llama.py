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

from loraplex.kernels.lora_ref import LoRABatch, LoRASlots, SlotFlags
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


class LoRAGroup(nn.Module):
    """The LoRA slot buffers of the projections that read one input (q/k/v, gate/up, o, down).

    Layout (see `kernels/lora_ref.py`): `lora_a[num_slots, in, max_rank * P]`, pre-transposed and
    interleaved rank-major, and per projection `lora_b{p}[num_slots, max_rank, out_p]`,
    pre-transposed, scaling folded in. `add` runs one shrink for the group and one expand per
    output slice that some adapter of the batch targets.
    """

    def __init__(self, in_features: int, out_features: list[int], num_slots: int, max_rank: int):
        super().__init__()
        self.num_proj = len(out_features)
        self.register_buffer("lora_a", torch.zeros(num_slots, in_features, max_rank * self.num_proj), persistent=False)
        for p, out in enumerate(out_features):
            self.register_buffer(f"lora_b{p}", torch.zeros(num_slots, max_rank, out), persistent=False)
        # Per projection and slot: does the adapter in that slot target it? (kept by the adapter
        # manager). When no segment's adapter targets a projection its expand is skipped: its
        # zero weights would only add 0.
        self.slot_flags = [SlotFlags(num_slots) for _ in out_features]
        self._slots: LoRASlots | None = None

    @property
    def slots(self) -> LoRASlots:
        """The kernels' view of the buffers (with cached per-slot views for the torch reference)."""
        if self._slots is None:
            self._slots = LoRASlots(self.lora_a, [getattr(self, f"lora_b{p}") for p in range(self.num_proj)])
        return self._slots

    def _apply(self, fn, *args, **kwargs):
        self._slots = None  # .to() / to_empty() replace the buffers: cached views would be stale
        return super()._apply(fn, *args, **kwargs)

    def add(self, ys: tuple[torch.Tensor, ...], x: torch.Tensor, ctx: "ForwardContext") -> None:
        """ys[p] += the LoRA term of projection p for every token in an adapter segment. In place."""
        lora = ctx.lora
        if lora is None or lora.empty:
            return
        if lora.slot_mask < 0:  # a CUDA graph capture: every expand, whatever the adapters
            targeted = list(ys)
        else:
            targeted = [y if flags.mask & lora.slot_mask else None for y, flags in zip(ys, self.slot_flags)]
        if any(y is not None for y in targeted):
            ctx.ops.add_lora(targeted, x, self.slots, lora)


class LoRAProjection(nn.Module):
    """A linear layer y = W x + b whose LoRA slots live in the `LoRAGroup` it shares with the
    projections that read the same input (the group adds the LoRA term for all of them).

    `lora_a[num_slots, max_rank, in]` and `lora_b[num_slots, out, max_rank]` are this
    projection's slots in PEFT's orientation, views into the group's buffers, so the adapter
    manager writes an adapter's A and B as they are stored; `slot_has_weights` is its flags.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._group: list[LoRAGroup] = []  # a plain list: the group is the parent's submodule, not ours

    def bind(self, group: LoRAGroup, index: int) -> "LoRAProjection":
        self._group, self._index = [group], index
        return self

    @property
    def lora_a(self) -> torch.Tensor:
        return self._group[0].slots.peft_a(self._index)

    @property
    def lora_b(self) -> torch.Tensor:
        return self._group[0].slots.peft_b(self._index)

    @property
    def slot_has_weights(self) -> SlotFlags:
        return self._group[0].slot_flags[self._index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.scale = d ** -0.5
        q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
        self.q_proj = LoRAProjection(h, q, cfg.qkv_bias)
        self.k_proj = LoRAProjection(h, kv, cfg.qkv_bias)
        self.v_proj = LoRAProjection(h, kv, cfg.qkv_bias)
        self.o_proj = LoRAProjection(q, h, cfg.o_bias)
        self.qkv_lora = LoRAGroup(h, [q, kv, kv], num_slots, max_rank)  # one shrink for q, k and v
        self.o_lora = LoRAGroup(q, [h], num_slots, max_rank)
        for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            proj.bind(self.qkv_lora, i)
        self.o_proj.bind(self.o_lora, 0)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        self.qkv_lora.add((q, k, v), x, ctx)
        q = apply_rope(q.view(t, self.num_heads, self.head_dim), ctx.cos, ctx.sin)
        k = apply_rope(k.view(t, self.num_kv_heads, self.head_dim), ctx.cos, ctx.sin)
        out = paged_attention(q, k, v.view(t, self.num_kv_heads, self.head_dim), kv_cache, ctx.attn, ctx.ops, self.scale)
        out = out.reshape(t, -1)
        y = self.o_proj(out)
        self.o_lora.add((y,), out, ctx)
        return y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = LoRAProjection(h, i, b)
        self.up_proj = LoRAProjection(h, i, b)
        self.down_proj = LoRAProjection(i, h, b)
        self.gate_up_lora = LoRAGroup(h, [i, i], num_slots, max_rank)  # one shrink for gate and up
        self.down_lora = LoRAGroup(i, [h], num_slots, max_rank)
        self.gate_proj.bind(self.gate_up_lora, 0)
        self.up_proj.bind(self.gate_up_lora, 1)
        self.down_proj.bind(self.down_lora, 0)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        self.gate_up_lora.add((gate, up), x, ctx)
        act = F.silu(gate) * up
        y = self.down_proj(act)
        self.down_lora.add((y,), act, ctx)
        return y


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

    def lora_groups(self):
        """Every LoRAGroup (slot buffers) of the model."""
        return [m for m in self.modules() if isinstance(m, LoRAGroup)]

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
