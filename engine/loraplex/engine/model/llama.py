"""The Llama-family transformer (Llama 2/3, SmolLM2, Mistral, Qwen2/3, Gemma 2/3, Phi-3) as
plain PyTorch.

One forward runs a flattened mixed batch: prefill chunks and decode tokens of many sequences,
each row with its own LoRA adapter (or none). Module names mirror Hugging Face's so that
checkpoint keys load one to one (Phi-3's fused qkv_proj / gate_up_proj are split by the loader).

The families share this one block; their quirks are the named fields of ModelConfig's second
half, each read in one place here: `qk_norm` (Attention), `norm_weight_offset` (RMSNorm),
`embed_scale` and `final_logit_softcap` (LlamaForCausalLM), `sandwich_norms` (DecoderLayer),
`attn_scale`, `attn_logit_softcap`, per-layer windows and the sliding layers' RoPE (Attention),
`hidden_act` (MLP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels.lora_batch import LoRABatch, LoRASlots, SlotFlags
from loraplex.kernels.ops import KernelOps
from loraplex.engine.model.attention import AttentionMetadata, paged_attention
from loraplex.engine.model.config import LORA_MODULES, ModelConfig
from loraplex.engine.model.rope import apply_rope, rope_cos_sin

ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class ForwardContext:
    """What every layer needs besides the hidden states; built once per step by the runner."""

    attn: AttentionMetadata
    lora: LoRABatch | None
    ops: KernelOps
    cos: torch.Tensor  # [T, head_dim] at each token's position
    sin: torch.Tensor
    local_cos: torch.Tensor | None = None  # Gemma 3: the sliding layers' own RoPE, else None
    local_sin: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """`offset` 1 is Gemma's variant: it scales by (1 + weight), in fp32, then casts."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class LoRAGroup(nn.Module):
    """The LoRA slot buffers of the projections that read one input (q/k/v, gate/up, o, down).

    Layout (see `kernels/loraplex/kernels/lora_batch.py`): `lora_a[num_slots, max_rank * P, in]`, interleaved
    rank-major, and per projection `lora_b{p}[num_slots, max_rank, out_p]`, pre-transposed,
    scaling folded in. `project` runs the group's projections with one shrink for the group
    and one expand per projection that some adapter of the batch targets.
    """

    def __init__(self, in_features: int, out_features: list[int], num_slots: int, max_rank: int):
        super().__init__()
        self.num_proj = len(out_features)
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank * self.num_proj, in_features), persistent=False)
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

    def project(self, x: torch.Tensor, projections: tuple["LoRAProjection", ...],
                ctx: "ForwardContext") -> tuple[torch.Tensor, ...]:
        """Each of the group's projections applied to x, with its LoRA term for every token in an
        adapter segment. The shrink runs first and each expand right after its projection's
        matmul, while that output is still in cache (kernels/loraplex/kernels/lora_ref.py has the measurement)."""
        lora = ctx.lora
        if lora is None or not lora.segments:
            return tuple(proj(x) for proj in projections)
        mask = lora.slot_mask
        if mask < 0:  # a CUDA graph capture: every expand, whatever the adapters
            targeted = [True] * self.num_proj
        else:
            targeted = [bool(flags.mask & mask) for flags in self.slot_flags]
            if not any(targeted):
                return tuple(proj(x) for proj in projections)
        ops, slots = ctx.ops, self.slots
        h = ops.lora_shrink(x, slots, lora)
        out = []
        for p, proj in enumerate(projections):
            y = proj(x)
            if targeted[p]:
                ops.lora_expand(y, h, slots, p, lora)
            out.append(y)
        return tuple(out)


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
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, layer: int):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.scale = cfg.attn_scale or d ** -0.5
        self.softcap = cfg.attn_logit_softcap
        self.sliding_window = cfg.layer_windows[layer] if cfg.layer_windows else None
        self.local_rope = self.sliding_window is not None and cfg.local_rope_theta is not None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_weight_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_weight_offset)
        else:
            self.q_norm = self.k_norm = None
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
        q, k, v = self.qkv_lora.project(x, (self.q_proj, self.k_proj, self.v_proj), ctx)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (ctx.local_cos, ctx.local_sin) if self.local_rope else (ctx.cos, ctx.sin)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = paged_attention(q, k, v, kv_cache, ctx.attn, ctx.ops, self.scale, self.sliding_window, self.softcap)
        out = out.reshape(t, -1)
        y, = self.o_lora.project(out, (self.o_proj,), ctx)
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
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        gate, up = self.gate_up_lora.project(x, (self.gate_proj, self.up_proj), ctx)
        act = self.act(gate) * up
        y, = self.down_lora.project(act, (self.down_proj,), ctx)
        return y


class Expert(nn.Module):
    """One of Mixtral's SwiGLU experts, with HF's names: w1 gate, w3 up, w2 down."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.w1, self.w3, self.w2 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Mixtral's MLP (HF's `block_sparse_moe`): the router's softmax (fp32) picks the top
    `experts_per_token` experts of each token, their weights renormalised to sum to 1; each
    chosen expert runs once over all of its tokens, experts in index order as in transformers.

    Listing each expert's tokens needs the host (a sync), which a CUDA graph cannot contain: while
    a decode graph is captured, every expert runs over every token instead and unchosen ones get
    weight 0 (`forward_dense`). Same sums in the same order, so the same bits; more FLOPs, which
    at graph-sized batches (a few tokens, most experts chosen anyway) cost little."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.num_experts))
        self.top_k = cfg.experts_per_token

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, chosen = F.softmax(self.gate(x).float(), dim=-1).topk(self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self.forward_dense(x)
        weights, chosen = self.route(x)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            token, k = (chosen == e).nonzero(as_tuple=True)
            y = self.experts[e](x[token]) * weights[token, k, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(x)
        gates = torch.zeros(x.shape[0], len(self.experts), dtype=weights.dtype, device=x.device)
        gates.scatter_(1, chosen, weights)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out += (expert(x) * gates[:, e, None]).to(out.dtype)
        return out


class DecoderLayer(nn.Module):
    """Pre-norm residual block. With `sandwich_norms` (Gemma 2/3) `post_attention_layernorm`
    normalises the attention output, and the MLP sits between `pre_feedforward_layernorm` and
    `post_feedforward_layernorm` (HF's names)."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, layer: int = 0):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset)  # noqa: E731
        self.self_attn = Attention(cfg, num_slots, max_rank, layer)
        if cfg.num_experts:
            self.block_sparse_moe = SparseMoE(cfg)
        else:
            self.mlp = MLP(cfg, num_slots, max_rank)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x: torch.Tensor, ctx: ForwardContext, kv_cache) -> torch.Tensor:
        if not self.sandwich:
            x = x + self.self_attn(self.input_layernorm(x), ctx, kv_cache)
            return x + self.feed_forward(self.post_attention_layernorm(x), ctx)
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx, kv_cache))
        return x + self.post_feedforward_layernorm(self.feed_forward(self.pre_feedforward_layernorm(x), ctx))

    def feed_forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.mlp(x, ctx) if hasattr(self, "mlp") else self.block_sparse_moe(x, ctx)


class DecoderStack(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, num_slots, max_rank, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, num_lora_slots: int = 0, max_lora_rank: int = 0, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg, num_lora_slots, max_lora_rank)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.reset_rope()

    def reset_rope(self, device: torch.device | None = None) -> None:
        """(Re)compute the RoPE tables in fp32: one per layer kind (Gemma 3's sliding layers have
        their own base)."""
        cfg = self.config
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, self.max_positions)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        local = (None, None)
        if cfg.local_rope_theta is not None:
            local = rope_cos_sin(cfg.head_dim, cfg.local_rope_theta, cfg.local_rope_scaling, self.max_positions)
            local = tuple(t.to(device) for t in local)
        self.register_buffer("local_rope_cos", local[0], persistent=False)
        self.register_buffer("local_rope_sin", local[1], persistent=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def lora_groups(self):
        """Every LoRAGroup (slot buffers) of the model."""
        return [m for m in self.modules() if isinstance(m, LoRAGroup)]

    def lora_projections(self):
        """(layer index, module name, projection) for every LoRA-targetable projection."""
        targets = self.config.projection_shapes()  # Mixtral: attention only
        for i, layer in enumerate(self.model.layers):
            for name in LORA_MODULES:
                if name in targets:
                    parent = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
                    yield i, name, getattr(parent, name)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                lora: LoRABatch | None, ops: KernelOps, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Flattened tokens [T] -> final hidden states [T, hidden]."""
        ctx = ForwardContext(attn=attn, lora=lora, ops=ops, cos=self.rope_cos[positions], sin=self.rope_sin[positions])
        if self.local_rope_cos is not None:
            ctx.local_cos, ctx.local_sin = self.local_rope_cos[positions], self.local_rope_sin[positions]
        x = self.model.embed_tokens(input_ids)
        if self.config.embed_scale != 1.0:  # Gemma; HF rounds the scale to the weights' dtype first
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, ctx, kv_cache)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
