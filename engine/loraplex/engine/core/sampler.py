"""Sampling over one batch of logits, vectorized: every row has its own settings.

`sample()` is the entry point: [B, V] fp32 logits, one row per sequence. The logits
processors (`logits_processors.py`: min_tokens, logit bias, presence/frequency penalties,
grammar masks) run first on the same [B, V] tensor, in place; then the repetition penalty,
temperature, top-k/top-p and the draw.

What stays off the hot path:
- per-row settings travel to the device as one tensor per field (`SamplingTensors`), built from
  Python lists; nothing reads a device value back per row;
- the random draws for unseeded rows are one call on the device's own generator; only rows
  with a `seed` use their own (CPU) generator, so that their tokens do not depend on the batch
  nor on the device;
- the step reads the results back once: the sampled ids and, if any row asked, their logprobs
  and the top-k, each as one `.tolist()` for the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from loraplex.engine.core.logits_processors import apply_logits_processors, apply_typical_p
from loraplex.engine.core.sequence import Sequence, TokenLogprob

@dataclass
class SamplingTensors:
    """The batch's per-row settings as device tensors, plus what Python already knows about them."""

    temperature: torch.Tensor  # [B] fp32, 1.0 on greedy rows (never divides by 0)
    top_k: torch.Tensor  # [B] int64, <= 0: off
    top_p: torch.Tensor  # [B] fp32
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    needs_top_k_top_p: bool  # some sampled row has top-k or top-p on: the sort is needed
    seeded_rows: list[int]  # rows that own a generator

    @classmethod
    def from_seqs(cls, seqs: Seq[Sequence], device: torch.device) -> "SamplingTensors":
        params = [s.params for s in seqs]
        greedy = [p.greedy for p in params]
        sampled = [p for p, g in zip(params, greedy) if not g]
        floats = torch.tensor([[1.0 if g else p.temperature for p, g in zip(params, greedy)],
                               [p.top_p for p in params]], dtype=torch.float32).to(device, non_blocking=True)
        ints = torch.tensor([[p.top_k for p in params], greedy], dtype=torch.int64).to(device, non_blocking=True)
        return cls(
            temperature=floats[0], top_p=floats[1], top_k=ints[0], greedy=ints[1].bool(),
            all_greedy=not sampled,
            needs_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
            seeded_rows=[i for i, (s, g) in enumerate(zip(seqs, greedy)) if not g and s.generator is not None],
        )


def apply_repetition_penalty(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """HF semantics: divide positive logits and multiply negative ones of every seen token
    (prompt and output). One masked update for the whole batch; rows without a penalty are
    untouched. In place; returns logits."""
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if not rows:
        return logits
    ids = [seqs[i].token_ids() for i in rows]
    width = max(len(t) for t in ids)
    vocab = logits.shape[1]
    # Pad with an extra column `vocab` that is dropped after the scatter.
    padded = torch.tensor([t + [vocab] * (width - len(t)) for t in ids], dtype=torch.int64).to(logits.device)
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, padded, True)
    seen = seen[:, :vocab]
    penalty = torch.tensor([seqs[i].params.repetition_penalty for i in rows], dtype=logits.dtype).to(logits.device)[:, None]
    index = torch.tensor(rows, dtype=torch.int64).to(logits.device)
    sub = logits.index_select(0, index)
    penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits.index_copy_(0, index, torch.where(seen, penalized, sub))
    return logits


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what lies outside each row's top-k and nucleus. top_k <= 0 and top_p == 1: off."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # Drop a token when the mass before it already reaches top_p; the best token always stays.
    mass_before = probs.cumsum(-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def exponential_noise(shape: torch.Size, seqs: Seq[Sequence], seeded_rows: list[int], device: torch.device,
                      generator: torch.Generator | None) -> torch.Tensor:
    """q ~ Exp(1) for every row: one draw on the device for all rows, then each seeded row's own
    draw from its generator (on the CPU, so a seed gives the same tokens on every device)."""
    q = torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=generator)
    for r in seeded_rows:
        q[r] = torch.empty(shape[1]).exponential_(generator=seqs[r].generator).to(device, non_blocking=True)
    return q


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None) -> list[int]:
    """logits: [B, V] float32, one row per sequence. Records logprobs on the sequences that ask.

    `generator` draws for unseeded rows; it must live on logits' device (the model runner owns
    one per device, seeded from the engine's seed)."""
    apply_logits_processors(logits, seqs)
    apply_repetition_penalty(logits, seqs)
    want_logprobs = [s.params.logprobs for s in seqs]
    logprobs = logits.log_softmax(-1) if any(k is not None for k in want_logprobs) else None

    st = SamplingTensors.from_seqs(seqs, logits.device)
    tokens = logits.argmax(-1)
    if not st.all_greedy:
        scaled = logits / st.temperature[:, None]
        if st.needs_top_k_top_p:
            scaled = top_k_top_p_mask(scaled, st.top_k, st.top_p)
        scaled = apply_typical_p(scaled, seqs)
        probs = scaled.softmax(-1)
        # Exponential-race sampling: argmax p / q with q ~ Exp(1) draws from probs.
        q = exponential_noise(probs.shape, seqs, st.seeded_rows, logits.device, generator)
        tokens = torch.where(st.greedy, tokens, (probs / q).argmax(-1))

    out = tokens.tolist()  # the step's one read-back of the sampled ids
    if logprobs is not None:
        _record_logprobs(logprobs, tokens, seqs, want_logprobs, out)
    return out


def _record_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence],
                     want: list[int | None], out: list[int]) -> None:
    """The chosen token's logprob and the top-k of every row that asked: one gather, one topk at
    the batch's largest k, one read-back each."""
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    k_max = max((k for k in want if k is not None), default=0)
    top_ids = top_vals = None
    if k_max > 0:
        top = logprobs.topk(k_max, dim=-1)
        top_ids, top_vals = top.indices.tolist(), top.values.tolist()
    for i, (seq, k) in enumerate(zip(seqs, want)):
        if k is None:
            continue
        top_k = list(zip(top_ids[i][:k], top_vals[i][:k])) if k > 0 else []
        seq.pending_logprobs.append(TokenLogprob(token_id=out[i], logprob=chosen[i], top=top_k))
