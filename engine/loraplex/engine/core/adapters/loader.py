"""One adapter load: fetch to disk (the disk tier) and parse into host tensors. Runs on the
manager's thread pool; holds no lock of the manager's."""
from __future__ import annotations

from pathlib import Path

import torch

from loraplex.engine.core.adapters.checkpoint import AdapterWeights, load_adapter
from loraplex.engine.core.adapters.disk_tier import DiskTier
from loraplex.engine.core.adapters.sources import download_folder, fetch_adapter
from loraplex.manifest import AdapterManifest


def read_adapter(manifest: AdapterManifest, adapter_dir: Path | None, cache_dir: Path | None, model_config,
                 max_rank: int, dtype: torch.dtype) -> AdapterWeights:
    """Fetch the manifest's files and parse them, checked against the digests it pins."""
    path = fetch_adapter(manifest, adapter_dir, cache_dir)
    return load_adapter(path, model_config, max_rank, dtype, sha256=manifest.sha256,
                        config_sha256=manifest.config_sha256)


class AdapterLoader:
    def __init__(self, config, model_config, dtype: torch.dtype, adapter_dir: Path | None, cache_dir: Path | None,
                 disk: DiskTier):
        self.model_config = model_config
        self.max_rank = config.max_lora_rank
        self.dtype = dtype
        self.pin = config.resolve_device().type == "cuda"  # pinned host memory: async copies into slots
        self.adapter_dir, self.cache_dir, self.disk = adapter_dir, cache_dir, disk

    def load(self, manifest: AdapterManifest) -> AdapterWeights:
        """Raises AdapterFormatError / AdapterSourceError with the reason."""
        folder = download_folder(manifest, self.cache_dir)
        self.disk.open(folder)
        try:
            weights = read_adapter(manifest, self.adapter_dir, self.cache_dir, self.model_config, self.max_rank,
                                   self.dtype)
        finally:
            self.disk.close(folder)
        if self.pin:
            weights.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in weights.weights.items()}
        return weights
