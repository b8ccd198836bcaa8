"""Per-row sampling over one batch of logits: every row has its own settings and generator."""
from __future__ import annotations

import torch

from loraplex.engine.core.logits_processors import apply_logits_processors
from loraplex.engine.core.sequence import Sequence, TokenLogprob


def apply_repetition_penalty(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """HF semantics: divide positive logits and multiply negative ones of every seen token."""
    for i, seq in enumerate(seqs):
        p = seq.params.repetition_penalty
        if p == 1.0:
            continue
        seen = torch.tensor(sorted(set(seq.token_ids())), dtype=torch.long, device=logits.device)
        vals = logits[i, seen]
        logits[i, seen] = torch.where(vals > 0, vals / p, vals * p)


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


def sample(logits: torch.Tensor, seqs: list[Sequence], default_generator: torch.Generator) -> list[int]:
    """logits: [B, V] float32, one row per sequence. Records logprobs on the sequences that ask."""
    apply_logits_processors(logits, seqs)
    apply_repetition_penalty(logits, seqs)
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    logprobs = logits.log_softmax(-1) if any(want_logprobs) else None

    greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
    tokens = logits.argmax(-1)
    if not bool(greedy.all()):
        rows = (~greedy).nonzero().flatten().tolist()
        sub = logits[rows] / torch.tensor([seqs[r].params.temperature for r in rows], device=logits.device)[:, None]
        sub = top_k_top_p_mask(
            sub,
            torch.tensor([seqs[r].params.top_k for r in rows], device=logits.device),
            torch.tensor([seqs[r].params.top_p for r in rows], device=logits.device),
        )
        probs = sub.softmax(-1)
        # Exponential-race sampling (argmax p/q, q ~ Exp(1)) draws from probs; q comes from the
        # row's own generator, drawn on the CPU so a seed gives the same tokens on every device.
        q = torch.stack([
            torch.empty(probs.shape[1]).exponential_(generator=seqs[r].generator or default_generator)
            for r in rows
        ]).to(probs.device)
        tokens[rows] = (probs / q).argmax(-1)

    out = tokens.tolist()
    if logprobs is not None:
        for i, seq in enumerate(seqs):
            k = seq.params.logprobs
            if k is None:
                continue
            row = logprobs[i]
            top = row.topk(k) if k > 0 else None
            seq.pending_logprobs.append(TokenLogprob(
                token_id=out[i], logprob=float(row[out[i]]),
                top=list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
            ))
    return out
