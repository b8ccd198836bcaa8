"""Settings of the HTTP layer (what EngineConfig does not hold)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("loraplex")
    except Exception:  # running from a source tree that is not installed
        return "0.0.0+unknown"


@dataclass
class ServerSettings:
    # JSON {"tenant": ["key", "pbkdf2_sha256$...", ...] or {"keys": [...], "weight", "limits"}}; docs/api.md
    api_keys_file: str | None = None
    admin_token_file: str | None = None  # one line: the admin bearer token
    metrics_token_file: str | None = None  # one line: a scraper's token; /metrics etc. then name restricted adapters
    adapter_manifest_file: str | None = None  # watched; reconciled into the adapter registry
    max_adapter_metric_labels: int = 100  # distinct per-adapter label values; beyond: "other"
    max_residency_metric_adapters: int = 256  # loraplex_adapter_resident series; beyond: the most recently used
    # The warm start (core/adapters/warm_start.py): before /ready answers 200, load the adapters the
    # operator's catalog places on pod `pod_name` (POD_NAME), for at most this long; 0: off.
    warm_start_budget_seconds: float = 0.0
    pod_name: str | None = None
    # --inject-delay: adapter key (`x@n` or `x`) -> seconds each of its requests waits before
    # the step loop (fault_injection.py; rollout drills). Empty: off.
    inject_delay: dict[str, float] = field(default_factory=dict)
    max_body_bytes: int = 1 << 20  # request bodies above this get 413 before any parsing
    # Browser origins (scheme://host[:port]) whose cross-site requests are let through and get
    # CORS answers; "*": every origin. Empty: cross-site POST/PUT/DELETE get 403 (middleware.py).
    allowed_origins: tuple[str, ...] = ()
    watch_interval_seconds: float = 1.0  # manifest and secret file polling
    adapter_load_wait_seconds: float = 120.0  # POST /v1/load_lora_adapter waits this long for the load
    tool_call_parser: str = "auto"  # hermes | llama3_json | auto (from the chat template); tools.py
    max_n: int = 16  # OpenAI `n` cap, and the cap on prompts x n of one request
    prepare_workers: int = 2  # threads that template, tokenize and validate requests; 0: on the event loop
    # Structured output (core/grammar_compiler.py): a grammar's compile and first token mask must be
    # ready within the time-out; at most `grammar_workers` compile at once; compiled grammars (and
    # those running requests still hold) stay within the byte budget.
    grammar_timeout_seconds: float = 5.0
    grammar_workers: int = 2
    grammar_cache_bytes: int = 256 << 20
    # Tenancy (tenants.py, quotas.py, usage.py): per-tenant state (quota buckets, usage totals and
    # metric labels) of tenants that an inference gateway names is kept for at most this many.
    max_tenants: int = 1000
    usage_log: str | None = None  # a JSON line per finished request (usage_sinks.py)
    usage_log_max_bytes: int = 100 << 20  # the file rotates at this size...
    usage_log_backups: int = 5  # ...keeping this many old files
    version: str = field(default_factory=package_version)
    # Called when the engine cannot be brought up (bad checkpoint, bad flag): the CLI stops the
    # server with exit status 1. Tests leave it None: /health then answers 503.
    on_fatal: Callable[[BaseException], None] | None = None
