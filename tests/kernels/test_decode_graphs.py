"""The CUDA-graph decode path, run eagerly (LORAPLEX_CUDA_GRAPHS=eager) on the Triton kernels:
static buffers, rows padded up to a captured size (scratch KV slot, context length 0, empty
LoRA segments), worst-case kernel grids reading the real bounds from memory, every LoRA expand
on. Greedy tokens of a mixed-adapter batch must equal the plain torch path's, and the padded
path must really have served the decode steps. (Capture itself needs CUDA: `make gpu-check`.)"""
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.kernels.ops import TORCH_OPS
from tests.engine.core.conftest import PROMPTS
from tests.engine.adapters.conftest import make_engine, register_all, tiny_adapters, wait_for  # noqa: F401 (fixture)


def test_padded_static_decode_path_matches_torch_path(tiny_models, tiny_adapters, monkeypatch):
    monkeypatch.setenv("LORAPLEX_KERNELS", "triton")
    monkeypatch.setenv("LORAPLEX_CUDA_GRAPHS", "eager")
    engine = make_engine(tiny_models["llama"], adapter_dir=str(tiny_adapters["llama"]), max_num_seqs=4)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4]
    register_all(engine, tiny_adapters["llama"])
    names = ["qv-r4", "all-r16-rslora"]
    for name in names:
        engine.adapters.request_load(name)
    wait_for(lambda: all(engine.adapters.get(n)["state"] == "host" for n in names))
    # 3 rows pad up to the size-4 graph; two adapters (ranks 4 and 16, different targets) and a
    # base row; then the batch shrinks as rows finish (sizes 2 and 1 without adapters).
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (6, 4, 3)]
    adapters = ["qv-r4", None, "all-r16-rslora"]
    padded = [r["token_ids"] for r in engine.generate(prompts, params, adapters)]
    assert graphs.replays >= 5
    engine.runner.ops, engine.runner.graphs = TORCH_OPS, None
    plain = [r["token_ids"] for r in engine.generate(prompts, params, adapters)]
    assert padded == plain
    assert [len(t) for t in padded] == [6, 4, 3]
