"""adapter_config.json: the PEFT options this engine serves, its numbers, and its per-module
rank and alpha (`rank_pattern` / `alpha_pattern`).

Everything here runs on an adapter's own config, which a tenant writes, on a thread of the
process that serves every tenant: so nothing may take time that grows faster than the config.
PEFT matches each pattern key with Python's `re` (`re.match(rf"(.*\\.)?({key})$", module)`, in
peft.utils.other.get_pattern_key), which backtracks while holding the GIL: one key with nested
quantifiers stalled every other tenant's requests for 39 s on the tiny test model (hours on a
32-layer one). Here a key may only be what PEFT writes
and what real adapters hold, a module name or a dotted suffix of one (`q_proj`,
`layers.0.self_attn.q_proj`, `^model.layers.0.mlp.down_proj`), and it is matched with PEFT's
meaning but in linear time: as in PEFT's regex, an unescaped '.' matches any one character, `\\.`
a dot, a leading '^' anchors the key at the start of the module name, a trailing '$' changes
nothing, and the key must match a whole dot-separated tail of the name. Any other key (a
quantifier, a group, a class, an alternation) is refused: the adapter fails to load, saying why.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

MAX_PATTERN_KEYS = 4096  # per pattern dict: one key per module of a 126-layer model is 882
MAX_PATTERN_KEY_LENGTH = 256
MAX_ALPHA = 1e6  # PEFT's alphas are small (r or 2r); any larger one is a mistake or an attack
KEY_SYNTAX = re.compile(r"\^?(?:[A-Za-z0-9_-]|\\\.|\.)+\$?")  # fullmatch: a '$' of re would allow a "\n"


class AdapterFormatError(ValueError):
    """The checkpoint is not a LoRA adapter this engine can apply to this base; says why."""


@dataclass(frozen=True)
class _Key:
    anchored: bool  # '^': the key must match the whole module name
    length: int  # characters of module name it matches (the key has no quantifier)
    body: re.Pattern  # quantifier-free: its fullmatch is a single linear pass


def _compile_key(field: str, key) -> _Key:
    if not isinstance(key, str) or len(key) > MAX_PATTERN_KEY_LENGTH or not KEY_SYNTAX.fullmatch(key):
        raise AdapterFormatError(
            f"{field} key {str(key)[:80]!r} is not a module name: keys may hold letters, digits, '_', '-', "
            "'.' and '\\.', with an optional leading '^' (a module name or a dotted suffix of one, "
            f"at most {MAX_PATTERN_KEY_LENGTH} characters); regular expressions are refused")
    anchored = key.startswith("^")
    body = key.removeprefix("^").removesuffix("$")
    return _Key(anchored, len(body.replace("\\.", ".")), re.compile(body))


class PatternTable:
    """One of `rank_pattern` / `alpha_pattern`, checked and compiled; `value(module)` is PEFT's
    lookup: the value of the first key (in the config's order) that matches, else the default."""

    def __init__(self, field: str, patterns, default, check_value):
        if not isinstance(patterns, dict):
            raise AdapterFormatError(f"{field} must be a JSON object (module name -> value)")
        if len(patterns) > MAX_PATTERN_KEYS:
            raise AdapterFormatError(f"{field} has {len(patterns)} keys; at most {MAX_PATTERN_KEYS} are served")
        self.default = default
        self.keys = [(_compile_key(field, k), check_value(f"{field}[{k!r}]", v)) for k, v in patterns.items()]

    def value(self, module: str):
        for key, value in self.keys:
            start = len(module) - key.length
            if start < 0 or (key.anchored and start) or (start and module[start - 1] != "."):
                continue  # PEFT's `(.*\.)?` prefix: the key starts the name or follows a dot
            if key.body.fullmatch(module, start):
                return value
        return self.default


def check_rank(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterFormatError(f"{what} must be a positive integer, got {value!r}")
    return value


def check_alpha(what: str, value) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not 0 < value <= MAX_ALPHA:
        raise AdapterFormatError(f"{what} must be a finite number in (0, {MAX_ALPHA:g}], got {value!r}")
    return float(value)


@dataclass
class Scaling:
    """Per-module rank and LoRA scaling, as PEFT computes them from adapter_config.json."""

    ranks: PatternTable
    alphas: PatternTable
    rslora: bool

    def rank(self, module: str) -> int:
        return self.ranks.value(module)

    def scale(self, module: str, r: int) -> float:
        alpha = self.alphas.value(module)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def parse_adapter_config(data: bytes) -> dict:
    try:
        cfg = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"adapter_config.json is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError("adapter_config.json must hold a JSON object")
    return cfg


def config_bytes(adapter_dir: Path) -> bytes:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise AdapterFormatError(f"missing adapter_config.json in {adapter_dir.name}")
    return path.read_bytes()


def read_adapter_config(adapter_dir: Path) -> dict:
    return parse_adapter_config(config_bytes(adapter_dir))


def check_adapter_config(cfg: dict) -> Scaling:
    """Refuse what cannot be served as PEFT means it; returns the checked per-module scaling."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"unsupported peft_type {cfg.get('peft_type')!r}: only LORA adapters are served")
    if cfg.get("use_dora"):
        raise AdapterFormatError("DoRA adapters (use_dora: true) are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterFormatError(f"modules_to_save {cfg['modules_to_save']} is not supported: an adapter may only add LoRA to the projections")
    if cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"LoRA bias {cfg['bias']!r} is not supported (only bias: none)")
    for flag in ("use_qalora", "lora_bias"):
        if cfg.get(flag):
            raise AdapterFormatError(f"{flag} is not supported")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterFormatError(f"use_rslora must be true or false, got {rslora!r}")
    r = check_rank("r", cfg.get("r", 8))  # PEFT's defaults
    alpha = check_alpha("lora_alpha", cfg.get("lora_alpha", 8))
    return Scaling(ranks=PatternTable("rank_pattern", cfg.get("rank_pattern") or {}, r, check_rank),
                   alphas=PatternTable("alpha_pattern", cfg.get("alpha_pattern") or {}, alpha, check_alpha),
                   rslora=rslora)
