"""A server whose chat template renders tools the Hermes way, for the client tests (structured
output, tools, penalties, the Responses API). Its base is the session's tiny random model, so
no output is valid JSON unless the grammar engine makes it so."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

HERMES_TEMPLATE = (
    "{%- if tools %}<|system|>You may call these functions: <tools>"
    "{%- for t in tools %}{{ t | tojson }}{%- endfor %}</tools> Reply with "
    "<tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|end|>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') %}<|assistant|>{{ m['content'] or '' }}"
    "{%- for c in m['tool_calls'] %}<tool_call>{\"name\": \"{{ c['function']['name'] }}\", "
    "\"arguments\": {{ c['function']['arguments'] | tojson }}}</tool_call>{%- endfor %}<|end|>"
    "{%- elif m['role'] == 'tool' %}<|user|><tool_response>{{ m['content'] }}</tool_response><|end|>"
    "{%- else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Berlin", "Rome"]},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}},
                   "required": ["zone"], "additionalProperties": False}}}

# Bounded, so that a random model under the grammar always finishes.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "pets", "verified"],
    "additionalProperties": False,
}


def hermes_checkpoint(base: Path, dst: Path) -> Path:
    """A copy of `base` whose tokenizer carries HERMES_TEMPLATE, with a 4096-token context (the
    tiny byte-level tokenizer spends many tokens on tool definitions)."""
    from transformers import AutoTokenizer

    shutil.copytree(base, dst, dirs_exist_ok=True)
    config = json.loads((dst / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (dst / "config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(dst)
    tok.chat_template = HERMES_TEMPLATE
    tok.save_pretrained(dst)
    return dst


MERGE_SOURCES = {"h13m1": dict(rank=8, alpha=32, seed=41, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "gate_proj", "up_proj", "down_proj"]),
                 "h13m2": dict(rank=8, alpha=8, seed=42, target_modules=["q_proj", "v_proj"])}
MERGE_WEIGHTS = [0.6, 1.4]


def merge_adapters_with_peft(base: Path, adapter_dir: Path) -> list[str]:
    """Two rank-8 adapters, and `h13ref`: their linear merge made by PEFT's add_weighted_adapter
    and saved as an ordinary adapter. Returns the names to preload."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bench.tiny import make_tiny_adapter

    for name, spec in MERGE_SOURCES.items():
        make_tiny_adapter(base, adapter_dir / name, **spec)
    names = list(MERGE_SOURCES)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      adapter_dir / names[0], adapter_name=names[0])
    model.load_adapter(adapter_dir / names[1], adapter_name=names[1])
    model.add_weighted_adapter(names, MERGE_WEIGHTS, "h13ref", combination_type="linear")
    model.save_pretrained(adapter_dir / "peft-merge", selected_adapters=["h13ref"])
    shutil.copytree(adapter_dir / "peft-merge" / "h13ref", adapter_dir / "h13ref", dirs_exist_ok=True)
    return [*names, "h13ref"]
