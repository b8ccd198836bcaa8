"""Adapter merging against PEFT: add_weighted_adapter for linear and ties, PEFT's own merge_utils
(the same math, same seed) for the DARE strategies."""
import math

import pytest
import torch

from loraplex.engine.core.adapters.checkpoint import load_adapter
from loraplex.engine.core.adapters.merge import DARE_SEED, MergeSpec, merge_adapters, merged_tenants
from loraplex.engine.core.errors import RequestError
from loraplex.engine.model.config import LORA_MODULES, ModelConfig
from bench.tiny import ALL_MODULES, make_tiny_adapter

pytestmark = pytest.mark.slow  # PEFT models are loaded for each reference

SPECS = {"m1": dict(rank=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], seed=31),
         "m2": dict(rank=8, alpha=32, target_modules=ALL_MODULES, seed=32),
         "m3": dict(rank=8, alpha=8, target_modules=["q_proj", "gate_proj"], seed=33, use_rslora=True)}


@pytest.fixture(scope="module")
def merge_assets(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = tiny_models["llama"]
    for name, spec in SPECS.items():
        make_tiny_adapter(base, root / name, **spec)
    cfg = ModelConfig.from_dir(base)
    loaded = {n: load_adapter(root / n, cfg, 64, torch.float32) for n in SPECS}
    return base, root, loaded


def peft_model(base, root, names):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      root / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(root / n, adapter_name=n)
    return model


def lora_layers(model):
    """(layer, module) -> PEFT LoraLayer, in PEFT's (named_modules) order."""
    out = {}
    for key, mod in model.named_modules():
        if hasattr(mod, "lora_A") and key.split(".")[-1] in LORA_MODULES:
            layer = int(key.split(".layers.")[1].split(".")[0])
            out[(layer, key.split(".")[-1])] = mod
    return out


@pytest.mark.parametrize("strategy,density,sign", [("linear", 1.0, "total"), ("ties", 0.5, "total"),
                                                   ("ties", 0.3, "frequency")])
def test_linear_and_ties_equal_peft_add_weighted_adapter(merge_assets, strategy, density, sign):
    base, root, loaded = merge_assets
    names, weights = ["m1", "m2", "m3"], [0.7, 1.3, -0.5]
    model = peft_model(base, root, names)
    model.add_weighted_adapter(names, weights, "merged", combination_type=strategy, density=density,
                               majority_sign_method=sign)
    ours = merge_adapters([loaded[n] for n in names], MergeSpec(tuple(names), tuple(weights), strategy, density, sign),
                          torch.float32)
    layers = lora_layers(model)
    assert set(ours.weights) == {k for k, m in layers.items() if "merged" in m.lora_A}
    for key, (a, b) in ours.weights.items():
        mod = layers[key]
        torch.testing.assert_close(a, mod.lora_A["merged"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, mod.lora_B["merged"].weight * mod.scaling["merged"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_dare_is_peft_merge_utils_with_a_fixed_seed(merge_assets, strategy):
    """add_weighted_adapter draws its new adapter's init from the global RNG before merging, so
    its DARE masks cannot be seeded from outside; PEFT's merge functions are, in its order."""
    from peft.utils import merge_utils

    base, root, loaded = merge_assets
    names, weights, density = ["m1", "m2"], [1.0, 0.6], 0.4
    model = peft_model(base, root, names)
    torch.manual_seed(DARE_SEED)
    ours = merge_adapters([loaded[n] for n in names], MergeSpec(tuple(names), tuple(weights), strategy, density),
                          torch.float32)
    torch.manual_seed(DARE_SEED)
    for key, mod in lora_layers(model).items():  # PEFT's loop, as _generalized_task_arithmetic_weighted_adapter
        having = [(n, w) for n, w in zip(names, weights) if n in mod.lora_A]
        roots = torch.tensor([math.sqrt(w * mod.scaling[n]) for n, w in having])
        merged = []
        for tensors in ([mod.lora_A[n].weight.data for n, _ in having], [mod.lora_B[n].weight.data for n, _ in having]):
            if strategy == "dare_linear":
                merged.append(merge_utils.dare_linear(tensors, roots, density))
            else:
                merged.append(merge_utils.dare_ties(tensors, roots, density, "total"))
        torch.testing.assert_close(ours.weights[key][0], merged[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.weights[key][1], merged[1], rtol=1e-5, atol=1e-6)
    again = merge_adapters([loaded[n] for n in names], MergeSpec(tuple(names), tuple(weights), strategy, density),
                           torch.float32)
    assert all(torch.equal(again.weights[k][0], ours.weights[k][0]) for k in ours.weights)


def test_bad_merges_are_refused(merge_assets, tiny_models, tmp_path):
    _, _, loaded = merge_assets
    for spec in (MergeSpec(("m1", "m2"), (1.0,)), MergeSpec((), ()), MergeSpec(("m1",), (1.0,), "svd"),
                 MergeSpec(("m1", "m1"), (1.0, 1.0)), MergeSpec(("m1",), (1.0,), density=0.0),
                 MergeSpec(("m1",), (1.0,), majority_sign_method="vote")):
        with pytest.raises(RequestError):
            spec.validate()
    make_tiny_adapter(tiny_models["llama"], tmp_path / "r4", rank=4, seed=3)
    r4 = load_adapter(tmp_path / "r4", ModelConfig.from_dir(tiny_models["llama"]), 64, torch.float32)
    with pytest.raises(RequestError, match="same rank"):
        merge_adapters([loaded["m1"], r4], MergeSpec(("m1", "r4"), (1.0, 1.0)), torch.float32)
    assert MergeSpec(("a", "b"), (1.0, 2.0)).name == MergeSpec(("a", "b"), (1.0, 2.0)).name
    assert MergeSpec(("a", "b"), (1.0, 2.0)).name != MergeSpec(("b", "a"), (1.0, 2.0)).name


def test_merged_tenants_are_the_keys_every_source_allows():
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    assert merged_tenants([[], []]) == []
    assert merged_tenants([[a, b], [], [b, c]]) == [b]
    only_admin = merged_tenants([[a], [c]])
    assert len(only_admin) == 1 and only_admin[0] not in (a, b, c)
