"""Per-request adapter merging (LoRAX `merged_adapters`): several LoRA adapters of one rank
combined into one, with PEFT's `add_weighted_adapter` math.

For every (layer, module), with the adapters that target it: the task tensors are the A's and,
separately, the B's (unscaled), each weighted by sqrt(|weight_i * scaling_i|) (a negative weight's
sign goes on A only); the merged adapter
has scaling 1 (PEFT sets lora_alpha = r). Strategies (peft.utils.merge_utils):
- linear: the weighted sum;
- ties: keep each tensor's top `density` fraction by magnitude, elect a sign per entry
  (`majority_sign_method` total | frequency), average the weighted entries that agree;
- dare_linear: drop entries at random (keep with probability `density`, rescale by 1/density),
  then the weighted sum;
- dare_ties: the DARE drop, then the TIES sign election.
DARE's draws come from a generator seeded with `DARE_SEED`, in PEFT's order (layers, then
q, k, v, o, gate, up, down, then A before B, adapters in request order), so a merge is
reproducible and its cache entry means one thing.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

from loraplex.engine.core.adapters.checkpoint import AdapterWeights
from loraplex.engine.core.errors import RequestError
from loraplex.engine.model.config import LORA_MODULES

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
MAX_MERGED_IDS = 8
DARE_SEED = 0


@dataclass(frozen=True)
class MergeSpec:
    ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    def validate(self, param: str = "merged_adapters") -> "MergeSpec":
        if not 1 <= len(self.ids) <= MAX_MERGED_IDS:
            raise RequestError(f"merged_adapters.ids takes 1 to {MAX_MERGED_IDS} adapters", param=f"{param}.ids")
        if len(set(self.ids)) != len(self.ids):
            raise RequestError("merged_adapters.ids must not repeat an adapter", param=f"{param}.ids")
        if len(self.weights) != len(self.ids):
            raise RequestError(f"merged_adapters has {len(self.ids)} ids but {len(self.weights)} weights",
                               param=f"{param}.weights")
        if any(not math.isfinite(w) or w == 0 for w in self.weights):
            raise RequestError("merged_adapters.weights must be finite and non-zero", param=f"{param}.weights")
        if self.strategy not in STRATEGIES:
            raise RequestError(f"merge_strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}",
                               param=f"{param}.merge_strategy")
        if not 0.0 < self.density <= 1.0:
            raise RequestError(f"density must be in (0, 1], got {self.density}", param=f"{param}.density")
        if self.majority_sign_method not in SIGN_METHODS:
            raise RequestError(f"majority_sign_method must be total or frequency, not {self.majority_sign_method!r}",
                               param=f"{param}.majority_sign_method")
        return self

    @property
    def name(self) -> str:
        """The merged adapter's name: the same parameters give the same name (the cache key)."""
        key = json.dumps([self.ids, self.weights, self.strategy, self.density, self.majority_sign_method])
        return f"merged-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# ---- PEFT's merge functions (peft.utils.merge_utils), on stacked task tensors -------------------

def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1.0, -1.0)


def _combine(tensors: list[torch.Tensor], weights: torch.Tensor, spec: MergeSpec,
             generator: torch.Generator) -> torch.Tensor:
    if spec.strategy == "ties":
        tensors = [_prune_magnitude(t, spec.density) for t in tensors]
    elif spec.strategy in ("dare_linear", "dare_ties"):
        tensors = [_prune_random(t, spec.density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if spec.strategy in ("linear", "dare_linear"):
        return weighted.sum(dim=0)
    mask = _sign_mask(stacked, spec.majority_sign_method)
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1.0)


def merge_adapters(sources: list[AdapterWeights], spec: MergeSpec, dtype: torch.dtype) -> AdapterWeights:
    """The merged adapter (scaling 1, folded as usual). Raises RequestError when the sources do
    not share one rank (as PEFT requires for these strategies)."""
    ranks = {a.shape[0] for s in sources for a, _ in s.weights.values()}
    if len(ranks) != 1:
        raise RequestError(f"merged_adapters must all have the same rank, got ranks {sorted(ranks)}",
                           param="merged_adapters.ids")
    generator = torch.Generator().manual_seed(DARE_SEED)
    keys = sorted({k for s in sources for k in s.weights}, key=lambda k: (k[0], LORA_MODULES.index(k[1])))
    merged: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for key in keys:
        having = [(s, w) for s, w in zip(sources, spec.weights) if key in s.weights]
        # sqrt(|w * scaling|) on both sides, the sign of a negative weight on A only (as PEFT)
        root = [math.sqrt(abs(w * s.scales[key])) for s, w in having]
        weights_a = torch.tensor([r * math.copysign(1.0, w) for r, (_, w) in zip(root, having)])
        a_list = [s.weights[key][0].float() for s, _ in having]
        b_list = [s.weights[key][1].float() / s.scales[key] for s, _ in having]  # unfold the scaling
        a = _combine(a_list, weights_a, spec, generator)
        b = _combine(b_list, torch.tensor(root), spec, generator)
        merged[key] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    digest = hashlib.sha256((spec.name + "".join(s.digest for s in sources)).encode()).hexdigest()
    return AdapterWeights(weights=merged, rank=ranks.pop(), target_modules=tuple(sorted({m for _, m in merged})),
                          nbytes=sum(a.nbytes + b.nbytes for a, b in merged.values()), digest=digest,
                          scales={k: 1.0 for k in merged})


def merged_tenants(tenant_lists: list[list[str]]) -> list[str]:
    """Who may call a merge: the keys allowed on every restricted source (no restricted source:
    everyone). Disjoint restrictions leave a digest no key has, so only the admin token passes."""
    restricted = [set(t) for t in tenant_lists if t]
    if not restricted:
        return []
    allowed = set.intersection(*restricted)
    return sorted(allowed) or [hashlib.sha256(b"loraplex: no tenant may call this merge").hexdigest()]


def ensure_merged(manager, spec: MergeSpec) -> str:
    """Make (or find) the merge of spec in `manager`; returns its adapter name. Reads sources
    from RAM when held there, else from their files. Blocking: call it on a worker thread. The
    caller has checked that every id exists and that the client may use it. At most
    --max-concurrent-merges run at once (merged_cache.py): over it, MergeCapacityError (429)."""
    from loraplex.engine.core.adapters.checkpoint import AdapterFormatError
    from loraplex.engine.core.adapters.loader import read_adapter
    from loraplex.engine.core.adapters.sources import AdapterSourceError
    from loraplex.engine.core.errors import AdapterUnavailableError

    name = spec.name
    if manager.use_merged(name):
        return name
    with manager.merged.building():
        sources, tenants = [], []
        for adapter in spec.ids:
            manifest = manager.manifest(adapter)
            if manifest is None:
                raise RequestError(f"merged_adapters: the adapter {adapter!r} does not exist",
                                   param="merged_adapters.ids")
            tenants.append(manifest.tenants)
            weights = manager.host_weights(adapter)
            if weights is None:
                try:
                    weights = read_adapter(manifest, manager.adapter_dir, manager.cache_dir, manager.model_config,
                                           manager.config.max_lora_rank, manager.dtype)
                except (AdapterFormatError, AdapterSourceError) as exc:
                    raise AdapterUnavailableError(f"merged_adapters: adapter {adapter!r} failed to load: {exc}",
                                                  param="merged_adapters.ids") from None
            sources.append(weights)
        manager.register_merged(name, merge_adapters(sources, spec, manager.dtype), merged_tenants(tenants))
    return name
