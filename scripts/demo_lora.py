"""Step 2: train the demo LoRA adapters (PEFT, CPU) and check that their style shows.

Each adapter uses its own rank and target-module set, so the demo also exercises mixed ranks
(r=4/8/16), rsLoRA scaling, and attention-only vs attention+MLP targets in one batch.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from scripts.demo_base import chat_prompt
from scripts.demo_cache import sha256_file, sha256_json

DATA_DIR = Path(__file__).resolve().parent / "demo_data"
# Bump when the training procedure changes, so cached adapters are retrained.
TRAIN_VERSION = 1
SEED = 1234
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    learning_rate: float = 1e-3
    steps: int = 40
    batch_size: int = 8
    preload: bool = False  # manifest: the engine loads it at start-up

    def dataset(self, data_dir: Path = DATA_DIR) -> Path:
        return data_dir / f"{self.name}.jsonl"


# Steps and learning rates are sized for the ~5 minute budget of a fresh run on 2 idle CPU cores
# (1.5-1.7 s per batch-8 step there): french needs the most help (a small English model learning
# to answer in French), json the least (a fixed format).
SPECS = (
    AdapterSpec("french", rank=8, alpha=16, target_modules=("q_proj", "v_proj"),
                learning_rate=3e-3, steps=40, preload=True),
    AdapterSpec("pirate", rank=16, alpha=32, target_modules=ATTN, learning_rate=1.5e-3, steps=30),
    # rsLoRA scales by alpha/sqrt(r) instead of alpha/r: an engine that ignores the flag gets
    # the scale wrong by sqrt(4) = 2x.
    AdapterSpec("json", rank=4, alpha=8, target_modules=ATTN + MLP, use_rslora=True,
                learning_rate=1.5e-3, steps=24),
)
# `--quick` (tests): same adapters and shapes, almost no training.
QUICK = {"steps": 5, "batch_size": 2}

# Not in any dataset: the style must generalise, not be recalled.
HELD_OUT = (
    "What is the capital of Germany?",
    "How can I improve my handwriting?",
    "What is the biggest animal on Earth?",
)
MAX_NEW_TOKENS = 40


class TrainingError(RuntimeError):
    pass


def quick_spec(spec: AdapterSpec) -> AdapterSpec:
    return replace(spec, **QUICK)


def training_key(spec: AdapterSpec, base_stamp: dict, data_dir: Path = DATA_DIR) -> str:
    """Content hash of everything the adapter depends on: a changed input retrains it."""
    if not spec.dataset(data_dir).is_file():
        raise TrainingError(f"dataset {spec.dataset(data_dir)} is missing")
    return sha256_json({
        "spec": asdict(spec) | {"preload": None},  # preload only affects the manifest
        "dataset_sha256": sha256_file(spec.dataset(data_dir)),
        "base": {k: base_stamp[k] for k in ("gguf_sha256", "dtype", "converter_version")},
        "train_version": TRAIN_VERSION, "seed": SEED, "held_out": HELD_OUT,
    })


def set_cpu_threads(threads: int | None = None) -> int:
    """Default: one torch thread per usable core.

    On an idle 2-core machine that is ~1.7x faster than one thread. On a busy machine the
    spinning OpenMP threads can make steps up to 10x slower; `--threads 1` (or
    OMP_WAIT_POLICY=PASSIVE) is then the better choice.
    """
    import torch

    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


# --- data -----------------------------------------------------------------------------------

def load_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(row["question"]), str(row["answer"])))
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"{path}:{i}: expected {{\"question\", \"answer\"}}: {e}") from e
    if not pairs:
        raise TrainingError(f"{path} holds no examples")
    return pairs


def encode_example(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """Chat-template ids of one exchange, and where the answer starts.

    The prompt is exactly what the engine renders for a user turn; the target is the answer
    plus <|im_end|>, so the adapter also learns to stop.
    """
    prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    return prompt + answer_ids + [tokenizer.eos_token_id], len(prompt)


def make_batch(examples: list[tuple[list[int], int]], pad_id: int):
    """Right-padded ids and a mask of the answer tokens (the loss targets)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for row, (seq, start) in enumerate(examples):
        ids[row, : len(seq)] = torch.tensor(seq)
        target[row, start : len(seq)] = True
    return ids, target


def batches(examples: list, batch_size: int, steps: int, seed: int):
    """`steps` batches drawn epoch by epoch in a seeded shuffle order."""
    rng = random.Random(seed)
    order: list = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(examples, len(examples))
        yield order[:batch_size]
        del order[:batch_size]


# --- training -------------------------------------------------------------------------------

def answer_loss(causal_lm, ids, target):
    """Cross-entropy on the answer tokens only.

    Two CPU shortcuts, each measured at roughly 2x in step time on 2 cores:
    - No attention mask. Padding is on the right and attention is causal, so no real token can
      see a pad; an explicit mask would only push SDPA onto its slow masked path.
    - The vocabulary projection (49152 x 576) runs on the answer positions alone, not on every
      position as `model(labels=...)` would.
    """
    import torch.nn.functional as F

    hidden = causal_lm.model(input_ids=ids, use_cache=False).last_hidden_state
    predicts = target[:, 1:]  # position t predicts token t+1
    logits = causal_lm.lm_head(hidden[:, :-1][predicts])
    return F.cross_entropy(logits.float(), ids[:, 1:][predicts])


def lora_config(spec: AdapterSpec):
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                      use_rslora=spec.use_rslora, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")


def load_base(base_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return model, tokenizer


def train_adapter(spec: AdapterSpec, base_dir: Path, out_dir: Path, data_dir: Path = DATA_DIR,
                  log=print) -> dict:
    """Fine-tune a fresh LoRA on the spec's dataset and save it (PEFT format) into `out_dir`."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(SEED)
    model, tokenizer = load_base(base_dir)
    peft_model = get_peft_model(model, lora_config(spec))
    causal_lm = peft_model.get_base_model()
    peft_model.train()

    examples = [encode_example(tokenizer, q, a) for q, a in load_pairs(spec.dataset(data_dir))]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    # Short linear warm-up, then linear decay to 10%: stable at the high LoRA learning rates
    # that a budget of a few dozen steps needs.
    warmup = max(1, spec.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 1.0 - 0.9 * max(0, s - warmup) / max(1, spec.steps - warmup)))

    losses = []
    for step, batch in enumerate(batches(examples, spec.batch_size, spec.steps, SEED)):
        loss = answer_loss(causal_lm, *make_batch(batch, tokenizer.pad_token_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == spec.steps - 1:
            log(f"    step {step + 1:3d}/{spec.steps}  loss {loss.item():.3f}")
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return {"first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
            "examples": len(examples)}


# --- checks ---------------------------------------------------------------------------------

def generate(model, tokenizer, questions, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers to single-turn questions, batched with left padding."""
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer([chat_prompt(tokenizer, q) for q in questions], add_special_tokens=False,
                    return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[:, enc.input_ids.shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def sample_answers(base_dir: Path, adapter_dir: Path, questions, with_base: bool):
    """Held-out answers from the *saved* adapter (so the files are what gets checked).

    Returns (adapter_answers, base_answers or None); the base answers come from the same model
    with the adapter disabled.
    """
    from peft import PeftModel

    model, tokenizer = load_base(base_dir)
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    answers = generate(peft_model, tokenizer, questions)
    base = None
    if with_base:
        with peft_model.disable_adapter():
            base = generate(peft_model, tokenizer, questions)
    return answers, base


FRENCH_WORDS = {"le", "la", "les", "est", "des", "une", "un", "et", "de", "du", "en", "il", "pour",
                "avec", "dans", "sont", "au", "aux", "vous", "votre", "plus", "sur", "ce", "qui"}
# Only words plain English does not use, so two hits mean the style, not the topic.
PIRATE_WORDS = ("arr", "matey", "ahoy", "ye", "yer", "me hearty", "shiver me timbers", "yo ho", "o'",
                "fer", "landlubber", "scallywag")


def looks_french(text: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ]+", text.lower())
    return sum(w in FRENCH_WORDS for w in words) >= 2


def looks_pirate(text: str) -> bool:
    words = re.findall(r"[a-z']+", text.lower())
    joined = " " + " ".join(words) + " "
    return sum(f" {w} " in joined for w in PIRATE_WORDS) >= 2


def looks_json(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and "answer" in obj


STYLE_CHECKS = {"french": looks_french, "pirate": looks_pirate, "json": looks_json}


def check_samples(name: str, answers: list[str], base: list[str]) -> list[str]:
    """Problems with an adapter's held-out answers (empty when fine).

    Every answer must differ from the base model's; at least 2 of 3 must show the style (one
    miss is tolerated: greedy output can shift slightly between CPUs).
    """
    problems = [f"answer to {q!r} is identical to the base model's"
                for q, a, b in zip(HELD_OUT, answers, base) if a == b]
    styled = sum(STYLE_CHECKS[name](a) for a in answers)
    if styled < len(answers) - 1:
        problems.append(f"only {styled}/{len(answers)} held-out answers look {name}")
    return problems
