"""What changes the logits before sampling, per row of a mixed batch:

1. min_tokens: EOS and stop token ids are forbidden until the row has that many output tokens;
2. logit_bias: token -> added value (OpenAI), all rows in one index_put_;
3. presence and frequency penalties (OpenAI semantics, over the output tokens): one scatter of
   token counts for the rows that ask, then `logits -= frequency * count + presence * (count > 0)`;
4. grammar masks (structured output): one bitmask for the rows with a grammar, filled by their
   matchers; rows without a grammar are untouched.

Rows that need none of it cost nothing; the batch's rows may mix all of these and adapters.
The sampler (temperature, top-k/p, repetition penalty, the draw) runs after.
"""
from __future__ import annotations

import torch

from loraplex.engine.core.sequence import Sequence
from loraplex.engine.core.structured_output import unpack_bitmask


def apply_logits_processors(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """logits: [B, V] float32, row i for seqs[i]; changed in place."""
    _min_tokens(logits, seqs)
    _logit_bias(logits, seqs)
    _penalties(logits, seqs)
    _grammar_masks(logits, seqs)


def _min_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows, cols = [], []
    for i, seq in enumerate(seqs):
        p = seq.params
        # A grammar decides itself when the output may end; forbidding EOS could leave no token.
        if p.min_tokens and len(seq.output_ids) < p.min_tokens and p.grammar is None:
            for t in (*seq.eos_token_ids, *p.stop_token_ids):
                rows.append(i)
                cols.append(t)
    if rows:
        dev = logits.device
        logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = float("-inf")


def _logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    vocab = logits.shape[1]
    rows, cols, vals = [], [], []
    for i, seq in enumerate(seqs):
        for t, v in (seq.params.logit_bias or {}).items():
            if 0 <= t < vocab:  # make_sequence refuses others; never index out of range here
                rows.append(i)
                cols.append(t)
                vals.append(v)
    if rows:
        dev = logits.device
        logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                          torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)


def _penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [i for i, s in enumerate(seqs)
            if (s.params.presence_penalty or s.params.frequency_penalty) and s.output_ids]
    if not rows:
        return
    vocab = logits.shape[1]
    width = max(len(seqs[i].output_ids) for i in rows)
    # Pad with an extra column (vocab) that is dropped after the scatter.
    ids = torch.full((len(rows), width), vocab, dtype=torch.long)
    for j, i in enumerate(rows):
        out = seqs[i].output_ids
        ids[j, :len(out)] = torch.tensor(out, dtype=torch.long)
    counts = torch.zeros(len(rows), vocab + 1, dtype=logits.dtype).scatter_add_(
        1, ids, torch.ones_like(ids, dtype=logits.dtype))[:, :vocab].to(logits.device)
    freq = torch.tensor([seqs[i].params.frequency_penalty for i in rows], dtype=logits.dtype, device=logits.device)
    pres = torch.tensor([seqs[i].params.presence_penalty for i in rows], dtype=logits.dtype, device=logits.device)
    index = torch.tensor(rows, device=logits.device)
    logits[index] -= freq[:, None] * counts + pres[:, None] * (counts > 0).to(logits.dtype)


def _grammar_masks(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.params.grammar is not None]
    if not rows:
        return
    vocab = logits.shape[1]
    bitmask = torch.full((len(rows), (vocab + 31) // 32), -1, dtype=torch.int32)
    for j, i in enumerate(rows):
        seqs[i].params.grammar.fill(seqs[i].output_ids, bitmask, j)
    allowed = unpack_bitmask(bitmask, vocab).to(logits.device)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def apply_typical_p(scaled: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """LoRAX/TGI `typical_p` (locally typical sampling, transformers' TypicalLogitsWarper) on the
    rows that set it below 1. Runs inside the sampler on the temperature-scaled logits, after
    top-k/top-p: TGI's warper order. Returns scaled with the atypical tokens at -inf."""
    rows = [i for i, s in enumerate(seqs) if s.params.typical_p < 1.0]
    if not rows:
        return scaled
    dev = scaled.device
    index = torch.tensor(rows, device=dev)
    scores = scaled[index]
    mass = torch.tensor([seqs[i].params.typical_p for i in rows], dtype=scores.dtype, device=dev)[:, None]
    normalized = scores.log_softmax(-1)
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
    shifted, order = (-normalized - entropy).abs().sort(dim=-1)
    cumulative = scores.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(dim=1).clamp_(max=shifted.shape[-1] - 1)
    remove = shifted > shifted.gather(1, last[:, None])
    remove[:, 0] = False  # the most typical token always stays
    scaled = scaled.clone()
    scaled[index] = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scaled
