"""Family details that the end-to-end parity tests (test_parity.py over all families,
tests/engine/api/test_families_http.py with adapters) do not reach on their own."""
import torch

from loraplex.engine.model.config import ModelConfig
from loraplex.engine.model.rope import rope_cos_sin
from bench.tiny import tiny_config


def test_longrope_tables_match_transformers_on_both_sides_of_the_training_length():
    """Positions before original_max_position_embeddings rotate with the short factors, later
    ones with the long factors, both scaled by the attention factor: transformers' Phi-3 RoPE for a
    short and for a long sequence, position by position."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    hf_cfg = tiny_config("phi3")
    original = hf_cfg.original_max_position_embeddings
    cfg = ModelConfig.from_dict(hf_cfg.to_dict() | {"architectures": ["Phi3ForCausalLM"]})
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, 2 * original)
    x = torch.zeros(1, dtype=torch.float32)
    short_cos, short_sin = Phi3RotaryEmbedding(hf_cfg)(x, torch.arange(original)[None])
    long_cos, long_sin = Phi3RotaryEmbedding(hf_cfg)(x, torch.arange(2 * original)[None])  # longer: long set
    assert torch.allclose(cos[:original], short_cos[0], atol=1e-6) and torch.allclose(sin[:original], short_sin[0], atol=1e-6)
    assert torch.allclose(cos[original:], long_cos[0, original:], atol=1e-6)
    assert torch.allclose(sin[original:], long_sin[0, original:], atol=1e-6)
    # the long set really is another rotation (or the test above proves nothing)
    short_only = dict(cfg.rope_scaling, long_factor=cfg.rope_scaling["short_factor"])
    assert not torch.allclose(cos[original:], rope_cos_sin(cfg.head_dim, cfg.rope_theta, short_only, 2 * original)[0][original:], atol=1e-3)


def test_family_quirks_are_read_from_the_checkpoint_config():
    gemma2 = ModelConfig.from_dict(tiny_config("gemma2").to_dict() | {"architectures": ["Gemma2ForCausalLM"]})
    assert gemma2.layer_windows == (8, None) and gemma2.attn_logit_softcap == 5.0 and gemma2.final_logit_softcap == 30.0
    assert gemma2.norm_weight_offset == 1.0 and gemma2.embed_scale == 64 ** 0.5 and gemma2.attn_scale == 24 ** -0.5
    assert gemma2.hidden_act == "gelu_pytorch_tanh" and gemma2.sandwich_norms and not gemma2.qk_norm
    gemma3 = ModelConfig.from_dict(tiny_config("gemma3").to_dict() | {"architectures": ["Gemma3ForCausalLM"]})
    assert gemma3.qk_norm and gemma3.rope_theta == 1e6 and gemma3.rope_scaling["factor"] == 4.0
    assert gemma3.local_rope_theta == 1e4 and gemma3.local_rope_scaling is None
    phi3 = ModelConfig.from_dict(tiny_config("phi3").to_dict() | {"architectures": ["Phi3ForCausalLM"]})
    assert phi3.fused_modules() == {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    assert phi3.layer_windows == (24, 24)


def test_windows_and_softcaps_run_the_torch_reference_on_every_kernel_set():
    """The kernels have no window or soft-cap: layers that need them get the torch references."""
    from loraplex.kernels import attention_ref
    from loraplex.kernels.ops import TORCH_OPS, attention_for

    import dataclasses

    triton_like = dataclasses.replace(TORCH_OPS, name="triton", paged_decode_attention=object(),
                                      paged_prefill_attention=object())
    assert attention_for(triton_like, None, None) == (triton_like.paged_prefill_attention, triton_like.paged_decode_attention)
    reference = (attention_ref.paged_prefill_attention_ref, attention_ref.paged_decode_attention_ref)
    assert attention_for(triton_like, 8, None) == reference and attention_for(triton_like, None, 30.0) == reference
    assert attention_for(TORCH_OPS, None, None) == reference


def test_mixtral_adapters_target_attention_only(tiny_models, tmp_path):
    """Mixtral's LoRA targets are the attention projections; an adapter on the router (`gate`)
    is refused, and the message names the targets this base has."""
    import pytest

    from loraplex.engine.core.adapters.checkpoint import AdapterFormatError, load_adapter
    from bench.tiny import make_tiny_adapter

    cfg = ModelConfig.from_dir(tiny_models["mixtral"])
    assert set(cfg.projection_shapes()) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ok = load_adapter(make_tiny_adapter(tiny_models["mixtral"], tmp_path / "attn", target_modules=["q_proj", "o_proj"]),
                      cfg, 16, torch.float32)
    assert ok.target_modules == ("o_proj", "q_proj")
    router = make_tiny_adapter(tiny_models["mixtral"], tmp_path / "router", target_modules=["gate"])
    with pytest.raises(AdapterFormatError, match=r"targets mlp\.gate; targets must be among q_proj, k_proj, v_proj, o_proj$"):
        load_adapter(router, cfg, 16, torch.float32)


def test_mixtral_dense_path_for_cuda_graphs_gives_the_same_bits(tiny_models):
    """Under CUDA-graph capture the MoE runs every expert with zero weights for unchosen ones
    (no host sync); on the same tokens it must give exactly the sparse path's output."""
    from tests.engine.core.conftest import make_engine

    moe = make_engine(tiny_models["mixtral"]).runner.model.model.layers[0].block_sparse_moe
    x = torch.randn(37, moe.gate.in_features) * 3
    with torch.no_grad():
        sparse, dense = moe(x, None), moe.forward_dense(x)
    assert len(moe.route(x)[1].unique()) == len(moe.experts)  # every expert is used by some token
    assert torch.equal(sparse, dense)
