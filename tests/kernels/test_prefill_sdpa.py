"""The CUDA prefill path (`paged_prefill_attention_sdpa`: gathered K/V in the cache dtype, fused
SDPA) against the fp32 reference: first chunks (causal, no earlier context) and later chunks
(causal with an offset), GQA groups 1/3/4, shuffled blocks, fp32/fp16/bf16.

It runs wherever torch runs (the CPU SDPA backends here, flash / memory-efficient on a GPU).
Tolerances as for decode attention: fp32 2e-5, fp16 2e-3, bf16 1.6e-2.
"""
import pytest
import torch

from loraplex.kernels.attention_ref import paged_prefill_attention_ref, paged_prefill_attention_sdpa

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2)], ids=lambda h: f"H{h[0]}-KV{h[1]}")
@pytest.mark.parametrize("n,context", [(20, 20), (1, 1), (7, 40), (16, 33)])
def test_prefill_sdpa_matches_reference(dtype, heads, n, context, device):
    h, kvh = heads
    g = torch.Generator().manual_seed(n * 100 + context)
    block_size, d = 16, 32
    nb = -(-context // block_size)
    total = nb + 3
    k = torch.randn(total, block_size, kvh, d, generator=g).to(dtype)
    v = torch.randn(total, block_size, kvh, d, generator=g).to(dtype)
    q = torch.randn(n, h, d, generator=g).to(dtype)
    table = torch.randperm(total, generator=g)[:nb].to(torch.int32)
    k, v, q, table = k.to(device), v.to(device), q.to(device), table.to(device)
    scale = d ** -0.5
    got = paged_prefill_attention_sdpa(q, k, v, table, context, scale)
    assert got.dtype == dtype and got.shape == q.shape
    want = paged_prefill_attention_ref(q.float(), k.float(), v.float(), table, context, scale)
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])
