"""Bad input gets a clear exception and the engine keeps serving others."""
import json
import shutil

import pytest

from loraplex.engine.core.errors import PromptTooLongError, RequestError
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.model.config import UnsupportedModelError
from tests.engine.core.conftest import PROMPTS, make_engine


@pytest.mark.parametrize("prompt,params,error,fragment", [
    ("", SamplingParams(), RequestError, "empty"),
    ([], SamplingParams(), RequestError, "empty"),
    ([1, 2, 10**6], SamplingParams(), RequestError, "token ids"),
    ("hello " * 200, SamplingParams(), PromptTooLongError, "maximum context length"),
    ("hi", SamplingParams(max_tokens=-1), RequestError, "max_tokens"),
    ("hi", SamplingParams(max_tokens=10**6), RequestError, "max_tokens"),
    ("hi", SamplingParams(temperature=-0.5), RequestError, "temperature"),
    ("hi", SamplingParams(top_p=0), RequestError, "top_p"),
    ("hi", SamplingParams(logprobs=99), RequestError, "logprobs"),
    ("hi", SamplingParams(logit_bias={10**6: 1.0}), RequestError, "logit_bias token ids"),
])
def test_bad_requests_are_refused_and_others_still_run(tiny_models, prompt, params, error, fragment):
    engine = make_engine(tiny_models["llama"], max_model_len=128)
    engine.add_request("good", PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    engine.step()
    with pytest.raises(error) as info:
        engine.add_request("bad", prompt, params)
    assert fragment in str(info.value)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.finish_reason for o in outs if o.finished] == ["length"]


def test_unknown_architecture_fails_at_startup_naming_it(tiny_models, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_models["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        make_engine(str(bad))


def test_missing_weights_fail_at_startup(tiny_models, tmp_path):
    bad = tmp_path / "noweights"
    shutil.copytree(tiny_models["llama"], bad)
    for f in bad.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        make_engine(str(bad))


def test_num_threads_sets_torch_cpu_threads(tiny_models):
    import torch

    before = torch.get_num_threads()
    try:
        make_engine(tiny_models["llama"], num_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
