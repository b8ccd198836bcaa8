"""Structured-output requests that make llguidance build a huge lexer (issue 20, "grammar bomb"),
one per construction: nested counted repetition in a regex, in a Lark terminal, in a JSON-schema
pattern, and Lark-level repetition. `bomb(i)` varies the counts so that no two share a cache entry.

Before the limits each cost the step thread 1.2-1.7 s and 200-270 MiB at its first mask, kept
for as long as the grammar stayed cached (measured on the tiny test model)."""
from __future__ import annotations


def bomb(i: int) -> dict:
    """The i-th bomb: the request fields of one structured-output request."""
    n = 1000 + i
    kinds = [
        {"guided_regex": f"a{{1000}}{{{n}}}"},
        {"guided_regex": f"((a{{100}}){{100}}){{{n // 10}}}"},
        {"guided_regex": f"(a{{1000}}b){{{n}}}"},
        {"guided_grammar": f"start: /a{{1000}}{{{n}}}/"},
        {"guided_json": {"type": "object", "properties": {"k": {"type": "string", "pattern": f"^(x{{900}}){{{n}}}$"}},
                         "required": ["k"]}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "string", "pattern": f"^a{{1000}}{{{n}}}$"}}}},
        {"guided_grammar": f"start: x~{n}\nx: \"a\"~1000"},
    ]
    return kinds[i % len(kinds)]


def rss_mib(pid: int) -> float:
    """The resident memory of process pid, in MiB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")
