"""Rotary position embeddings, with the rope scalings that the supported families use."""
from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(head_dim: int, theta: float, scaling: dict | None, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, head_dim] in fp32 (halves repeated, HF's layout)."""
    t = torch.arange(max_positions, dtype=torch.float32)
    if scaling and scaling.get("rope_type") == "longrope":
        return _longrope_cos_sin(head_dim, theta, scaling, t)
    freqs = torch.outer(t, rope_inv_freq(head_dim, theta, scaling))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _longrope_cos_sin(head_dim: int, theta: float, scaling: dict, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3's LongRoPE ("su"): per-frequency divisors, `short_factor` within the training
    length and `long_factor` beyond it, and cos/sin scaled by an attention factor.

    transformers picks the set per forward from the longest position in it; here each position
    has its own, so a token's rotation never depends on what else is in the batch (and a cached
    block stays valid). Both agree whenever the prompt fits in the training length: its prefill
    uses the short set, and each later token past that length the long one."""
    original = int(scaling["original_max_position_embeddings"])
    target = scaling.get("max_position_embeddings") or original
    factor = scaling.get("factor") or target / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * base)
    long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32) * base)
    freqs = torch.where((t < original)[:, None], torch.outer(t, short), torch.outer(t, long))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention, emb.sin() * attention


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim] already gathered at the token positions."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
