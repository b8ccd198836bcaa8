"""Tensor parallelism inside the model: which slice of each weight a rank holds, and the
collectives of its forward.

Megatron's layout (vLLM's `ColumnParallelLinear` / `RowParallelLinear`) over one
torch.distributed process group of N ranks; rank r of N holds:
- column-parallel q, k, v, gate, up (Phi-3's fused qkv_proj / gate_up_proj are split first):
  rows [r*out/N, (r+1)*out/N) of W and of the bias. For q/k/v that is whole heads: q heads
  [r*H/N, (r+1)*H/N) and kv heads [r*KV/N, (r+1)*KV/N), exactly the kv heads those q heads
  read under GQA (so KV % N == 0 is required; kv heads are not replicated). Attention and the
  gated activation then run on the rank's own heads / columns: no collective.
- row-parallel o, down: columns [r*in/N, (r+1)*in/N) of W; each rank multiplies its shard of
  the input and ONE all-reduce per layer sums the partial outputs. The bias sits on rank 0 only
  (zeros elsewhere), so the sum adds it once.
- vocab-parallel embedding and lm_head: rows [r*Vp, (r+1)*Vp) of the vocabulary, Vp =
  ceil(V/N) (the last rank's tail rows are zero padding). The embedding looks up the ids in
  its range, zeros the others, and all-reduces; the lm_head computes its slice of the logits
  and rank 0 gathers them (the sampler runs on rank 0 alone).
- Mixtral's experts: each split like the MLP (w1/w3 column-, w2 row-parallel), the router whole;
  one all-reduce after the mixture.
- everything else (norms, q/k norms, rope tables, the MoE router) whole.
So a layer costs two all-reduces of [T, hidden] (after o and after down), a step one more for
the embedding and one gather of [rows, Vp] for the logits.

LoRA, as S-LoRA shards it (vLLM's `ColumnParallelLinearWithLoRA` / `RowParallelLinearWithLoRA`):
- column-parallel target: the full A (the input is whole on every rank: the shrink is
  replicated), B sliced to the rank's output rows. No extra collective.
- row-parallel target: A sliced along its input dim (the rank's input shard), B whole. The
  rank's term x_r A_r^T B is added to its partial output before the layer's all-reduce, which
  sums sum_r (x_r A_r^T) B = (x A^T) B: the one all-reduce the layer has anyway.
`shard_lora` makes a rank's slices; the existing `LoRAGroup` buffers, sized from the rank's
shard config, hold them unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.model.config import ModelConfig, UnsupportedModelError
from loraplex.engine.model.llama import MLP, Attention, LlamaForCausalLM, SparseMoE

# Mixtral's experts: w1 (gate) and w3 (up) are column-parallel, w2 (down) row-parallel.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3")
ROW_PARALLEL = ("o_proj", "down_proj", "w2")
VOCAB_PARALLEL = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group. The collectives use torch.distributed's
    default process group (one per engine: gloo on the CPU, NCCL on CUDA)."""

    rank: int
    size: int

    def span(self, n: int) -> tuple[int, int]:
        """This rank's [lo, hi) of a dimension of n that N divides."""
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per

    def vocab_span(self, vocab: int) -> tuple[int, int, int]:
        """(lo, hi, rows held): this rank's vocabulary rows; hi - lo < rows held on the last rank."""
        per = -(-vocab // self.size)
        lo = min(self.rank * per, vocab)
        return lo, min(lo + per, vocab), per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(x)
        return x

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's x, in rank order, on rank 0 (None on the others)."""
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return parts


def check_tensor_parallel(cfg: ModelConfig, size: int) -> None:
    """Refuse, before any process starts, a model that cannot be split N ways (all reasons at once)."""
    if size == 1:
        return
    problems = []
    if cfg.num_heads % size:
        problems.append(f"num_attention_heads {cfg.num_heads} is not divisible by it")
    if cfg.num_kv_heads % size:
        problems.append(f"num_key_value_heads {cfg.num_kv_heads} is not divisible by it "
                        "(key/value heads are split across ranks, never replicated)")
    if cfg.intermediate_size % size:
        problems.append(f"intermediate_size {cfg.intermediate_size} is not divisible by it")
    if cfg.fp8_block:  # each rank's slice must be whole blocks, so that it takes whole scales
        bo, bi = cfg.fp8_block
        shapes = split_shapes(cfg)
        split = [n for n in COLUMN_PARALLEL if n in shapes and shapes[n][1] % (size * bo)]
        split += [n for n in ROW_PARALLEL if n in shapes and shapes[n][0] % (size * bi)]
        if split:
            problems.append(f"its fp8 weight blocks ({bo}x{bi}) would be cut by the shard boundaries of "
                            f"{', '.join(split)} (each rank's rows of q/k/v/gate/up and columns of o/down "
                            "must be a whole number of blocks)")
    if problems:
        raise UnsupportedModelError(f"--tensor-parallel-size {size} cannot split {cfg.architecture}: "
                                    + "; ".join(problems))


def shard_config(cfg: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """The config of one rank's slice: its heads, kv heads, MLP columns and vocabulary rows. The
    stock Attention / MLP / KV cache built from it have exactly the rank's shapes."""
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp.size, num_kv_heads=cfg.num_kv_heads // tp.size,
                               intermediate_size=cfg.intermediate_size // tp.size,
                               vocab_size=tp.vocab_span(cfg.vocab_size)[2])


class VocabParallelEmbedding(nn.Module):
    def __init__(self, tp: TensorParallel, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = tp
        self.start, _, self.rows = tp.vocab_span(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)


class ParallelLMHead(nn.Module):
    """Full logits [rows, V] on rank 0; on the other ranks their own slice (for nobody)."""

    def __init__(self, tp: TensorParallel, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.weight = nn.Parameter(torch.empty(tp.vocab_span(vocab_size)[2], hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)
        parts = self.tp.gather_to_first(local)
        return local if parts is None else torch.cat(parts, dim=-1)[:, :self.vocab_size]


class RowParallelAttention(Attention):
    """The stock attention on the rank's heads (q/k/v column-parallel, LoRA included); o_proj
    and its LoRA term give a partial sum, reduced once."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, layer: int, tp: TensorParallel):
        super().__init__(cfg, num_slots, max_rank, layer)
        self.tp = tp

    def forward(self, x, ctx, kv_cache):
        return self.tp.all_reduce(super().forward(x, ctx, kv_cache))


class RowParallelMLP(MLP):
    """gate/up column-parallel, down row-parallel: one all-reduce after down (and its LoRA term)."""

    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, tp: TensorParallel):
        super().__init__(cfg, num_slots, max_rank)
        self.tp = tp

    def forward(self, x, ctx):
        return self.tp.all_reduce(super().forward(x, ctx))


class RowParallelMoE(SparseMoE):
    """Mixtral's MLP with every expert split like the MLP (w1/w3 columns, w2 rows) and the router
    whole: every rank routes each token to the same experts, runs its slice of them, and one
    all-reduce sums the partial outputs (vLLM's tensor-parallel MoE without expert parallelism)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__(cfg)
        self.tp = tp

    def forward(self, x, ctx):
        return self.tp.all_reduce(super().forward(x, ctx))


def build_parallel_model(cfg: ModelConfig, tp: TensorParallel, num_lora_slots: int, max_lora_rank: int,
                         max_positions: int | None) -> LlamaForCausalLM:
    """The stock model built from the rank's shard config, with its embedding, lm_head,
    attention and MLP swapped for the parallel ones (same parameter names, so checkpoint keys
    load one to one). `model.config` is the shard's; `model.full_config` the checkpoint's."""
    shard = shard_config(cfg, tp)
    model = LlamaForCausalLM(shard, num_lora_slots, max_lora_rank, max_positions or cfg.max_position_embeddings)
    model.model.embed_tokens = VocabParallelEmbedding(tp, cfg.vocab_size, cfg.hidden_size)
    model.lm_head = ParallelLMHead(tp, cfg.vocab_size, cfg.hidden_size)
    model.tie_weights()
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = RowParallelAttention(shard, num_lora_slots, max_lora_rank, i, tp)
        if cfg.num_experts:
            layer.block_sparse_moe = RowParallelMoE(shard, tp)
        else:
            layer.mlp = RowParallelMLP(shard, num_lora_slots, max_lora_rank, tp)
    model.full_config, model.tp = cfg, tp
    return model


def split_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) in the whole model of every projection that is split."""
    shapes = dict(cfg.projection_shapes())
    if cfg.num_experts:
        h, i = cfg.hidden_size, cfg.intermediate_size
        shapes.update(w1=(h, i), w3=(h, i), w2=(i, h))
    return shapes


def fp8_scale_shape(cfg: ModelConfig, module_name: str) -> tuple[int, int]:
    """The checkpoint's (whole model's) block-scale shape of a projection."""
    proj = module_name.rsplit(".", 1)[-1]
    shapes = split_shapes(cfg)
    if proj not in shapes:
        raise UnsupportedModelError(f"{module_name} has fp8 weights; under tensor parallelism only the split "
                                    "projections may be fp8")
    (fan_in, fan_out), (bo, bi) = shapes[proj], cfg.fp8_block
    return -(-fan_out // bo), -(-fan_in // bi)


def read_shard(f, file_key: str, cfg: ModelConfig, tp: TensorParallel) -> list[tuple[str, torch.Tensor]]:
    """(engine key, this rank's slice) for one tensor of an open safetensors file, read with
    `get_slice` so that only the slice leaves the file. Fused modules (Phi-3) are split into
    their projections first, each then sliced as a column-parallel one."""
    parts = file_key.split(".")
    module, leaf = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", file_key)
    view = f.get_slice(file_key)
    shape = view.get_shape()
    fused = cfg.fused_modules()
    if module in fused:
        names = fused[module]
        sizes = [cfg.projection_shapes()[n][1] for n in names]
        if shape[0] != sum(sizes):
            raise UnsupportedModelError(f"weight {file_key!r} has {shape[0]} rows, expected {sum(sizes)} ({' + '.join(names)})")
        prefix, out, offset = ".".join(parts[:-2]), [], 0
        for name, size in zip(names, sizes):
            lo, hi = tp.span(size)
            out.append((f"{prefix}.{name}.{leaf}", view[offset + lo:offset + hi]))
            offset += size
        return out
    if leaf == "weight_scale_inv":  # fp8 block scales: the blocks of the rank's slice (aligned: check_tensor_parallel)
        (fan_in, fan_out), (bo, bi) = split_shapes(cfg)[module], cfg.fp8_block
        if module in COLUMN_PARALLEL:
            lo, hi = tp.span(fan_out)
            return [(file_key, view[lo // bo:hi // bo])]
        lo, hi = tp.span(fan_in)
        return [(file_key, view[:, lo // bi:hi // bi])]
    if module in COLUMN_PARALLEL:
        lo, hi = tp.span(shape[0])
        return [(file_key, view[lo:hi])]
    if module in ROW_PARALLEL:
        if leaf == "bias":  # added once: by rank 0
            return [(file_key, view[:] if tp.rank == 0 else torch.zeros(shape))]
        lo, hi = tp.span(shape[1])
        return [(file_key, view[:, lo:hi])]
    if module in VOCAB_PARALLEL:
        lo, hi, rows = tp.vocab_span(shape[0])
        held = view[lo:hi]
        if hi - lo < rows:  # the last rank's padding rows
            held = torch.cat([held, held.new_zeros(rows - (hi - lo), *held.shape[1:])])
        return [(file_key, held)]
    return [(file_key, view[:])]


def shard_lora(weights: dict, tp: TensorParallel) -> dict:
    """One rank's slices of an adapter's (layer, module) -> (A [r, in], B [out, r]): column-parallel
    targets keep A whole and slice B's rows; row-parallel ones slice A's columns and keep B."""
    out = {}
    for (layer, module), (a, b) in weights.items():
        if module in ROW_PARALLEL:
            lo, hi = tp.span(a.shape[1])
            a = a[:, lo:hi]
        else:
            lo, hi = tp.span(b.shape[0])
            b = b[lo:hi]
        out[(layer, module)] = (a.clone(), b.clone())  # compact: a pickled view would carry its whole storage
    return out
