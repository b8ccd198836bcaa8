import torch

from loraplex.engine.core.config import EngineConfig
from loraplex.engine.core.llm_engine import LLMEngine

from tests.conftest import FAMILIES  # noqa: F401  (used by the tests here)


def make_engine(model_dir: str, **overrides) -> LLMEngine:
    cfg = dict(model_id=model_dir, device="cpu", num_kv_blocks=256, max_num_batched_tokens=256, max_num_seqs=16,
               max_active_adapters=4, max_lora_rank=16)
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg))


def hf_greedy(hf, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


PROMPTS = [
    "The quick brown fox",
    "Paris is the capital of France. Berlin is",
    "LoRA adapters share one base model; the KV cache is paged in blocks. Continuous batching admits new requests",
    "0123456789",
    "Continuous",
]


def prefill_in_one_forward(engine, rows: list[tuple[str, str | None]], ops=None):
    """Prefill (prompt, adapter) rows together in one forward pass, as the runner orders them.

    Returns (sequences in batch order, the batch's LoRA segments, all-position logits per
    sequence). Blocks and adapter slots are released afterwards. `ops` replaces the kernels."""
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.engine.core.scheduler import ScheduledSeq

    seqs = [engine.make_sequence(f"r{i}", p, SamplingParams(max_tokens=1), a) for i, (p, a) in enumerate(rows)]
    for seq in seqs:
        assert engine.adapters.acquire(seq)
        engine.block_manager.grow(seq, seq.num_tokens)
    seqs.sort(key=lambda s: s.lora_slot)  # the runner's segment order
    batch = [ScheduledSeq(seq, seq.num_tokens) for seq in seqs]
    runner = engine.runner
    step = runner.prepare(batch)
    lora = step.lora
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(step.ids, step.positions, step.attn, lora, ops or runner.ops,
                                                          runner.kv_caches))
    per_seq, start = [], 0
    for seq in seqs:
        per_seq.append(logits[start:start + seq.num_tokens])
        start += seq.num_tokens
        engine.block_manager.free(seq)
        engine.adapters.release(seq)
    return seqs, lora, per_seq
