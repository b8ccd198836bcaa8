"""Session fixtures shared by the engine and LoRA tests: random tiny checkpoints of each family."""
import pytest
import torch

from bench.tiny import make_tiny_checkpoint

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    paths = {f: str(make_tiny_checkpoint(root / f, f)) for f in FAMILIES}
    paths["llama-sharded"] = str(make_tiny_checkpoint(root / "llama-sharded", "llama", max_shard_size="50KB"))
    return paths


@pytest.fixture(scope="session")
def hf_models(tiny_models):
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = AutoModelForCausalLM.from_pretrained(tiny_models[name], dtype=torch.float32).eval()
        return cache[name]

    return get
