"""`loraplex-engine`: the flags of ARCHITECTURE.md's Engine CLI, plus a few for the HTTP layer.

Flags map one to one onto EngineConfig (engine) and ServerSettings (HTTP). Defaults come from
those dataclasses so they cannot drift apart. The server starts answering /health while the
model loads; if the engine cannot start, the process exits with status 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from loraplex.engine.api.fault_injection import DelayAction, parse_delay, warn_if_set
from loraplex.engine.api.settings import ServerSettings

log = logging.getLogger("loraplex.engine.api")


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _checked(convert, ok, what: str, name: str):
    """An argparse type: `convert` the text, then refuse values that are not `ok`, saying `what`
    they must be. `name` is what argparse prints for text that does not convert at all."""
    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = name
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer", "positive integer")
_non_negative_int = _checked(int, lambda v: v >= 0, ">= 0", "non-negative integer")
_positive_float = _checked(float, lambda v: v > 0, "> 0", "positive number")
_non_negative_float = _checked(float, lambda v: v >= 0, ">= 0", "non-negative number")
_fraction = _checked(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]", "fraction")


UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def _bytes(text: str) -> int:
    """A byte count: 123, 512MiB, 4GiB, 1.5GB."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m[2].lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"must be a byte count like 1073741824, 512MiB or 4GiB, got {text!r}")
    value = int(float(m[1]) * UNITS[m[2].lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from loraplex.engine.core.config import EngineConfig  # light: dataclass + torch dtypes

    e, s = _defaults(EngineConfig), _defaults(ServerSettings)
    p = argparse.ArgumentParser(prog="loraplex-engine", description="Serve many LoRA adapters on one base model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model-id", required=True, help="local checkpoint folder or Hugging Face repo id")
    m.add_argument("--revision", default=None, help="Hub revision of --model-id")
    m.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: last part of --model-id)")
    m.add_argument("--device", default=e["device"], choices=["auto", "cpu", "cuda"])
    m.add_argument("--dtype", default=e["dtype"], choices=["auto", "float32", "float16", "bfloat16"])
    m.add_argument("--num-threads", type=_positive_int, default=None,
                   help="torch intra-op CPU threads (default: torch's choice; set it below the pod's CPU limit)")
    m.add_argument("--tensor-parallel-size", type=_positive_int, default=e["tensor_parallel_size"],
                   help="split the model over N ranks (gloo on the CPU, NCCL on CUDA); rank 0 starts the N-1 workers")
    m.add_argument("--tensor-parallel-timeout", type=_positive_float, default=e["tensor_parallel_timeout"],
                   help="seconds a rank waits in a collective, or for the workers to join, before the engine fails")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8080)
    kv = p.add_argument_group("KV cache and batching")
    kv.add_argument("--block-size", type=_positive_int, default=e["block_size"])
    size = kv.add_mutually_exclusive_group()
    size.add_argument("--num-kv-blocks", type=_positive_int, default=None, help="KV cache size in blocks")
    size.add_argument("--kv-cache-memory-fraction", type=_fraction, default=e["kv_cache_memory_fraction"],
                      help="CUDA: share of the GPU memory for weights, activations (measured) and the KV cache")
    kv.add_argument("--max-num-seqs", type=_positive_int, default=e["max_num_seqs"])
    kv.add_argument("--max-num-batched-tokens", type=_positive_int, default=e["max_num_batched_tokens"])
    kv.add_argument("--max-model-len", type=_positive_int, default=None)
    kv.add_argument("--max-waiting", type=_non_negative_int, default=e["max_waiting"],
                    help="bounded request queue: beyond it requests get 429")
    kv.add_argument("--tenant-scheduling", default=e["tenant_scheduling"], choices=["vtc", "fcfs"],
                    help="admission order across tenants: vtc (least weighted service first, no credit for idle "
                         "time) or fcfs (arrival order)")
    kv.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=e["enable_prefix_caching"],
                    help="share the KV blocks of equal prompt prefixes under the same adapter")
    a = p.add_argument_group("adapters")
    a.add_argument("--adapter-source", default=e["adapter_source"], choices=["local", "hub", "s3"],
                   help="the default source: of --preload-adapters, and of adapter names nobody registered")
    a.add_argument("--adapter-dir", default=None, help="root of local adapters (local uris and names resolve under it)")
    a.add_argument("--adapter-cache-dir", default=None, help="download cache for Hub and S3 adapters (the disk tier)")
    a.add_argument("--adapter-s3-prefix", default=None, help="s3://bucket/prefix/: where names live for --adapter-source s3")
    a.add_argument("--dynamic-adapters", default=e["dynamic_adapters"], choices=["auto", "on", "off", "admin"],
                   help="serve unregistered names from the default source: on (any caller allowed to infer), admin "
                        "(admin token only), off; auto = on for local, off for hub and s3")
    a.add_argument("--max-concurrent-adapter-loads", type=_positive_int, default=e["max_concurrent_adapter_loads"],
                   help="name resolutions (lookups, downloads) running at once; more wait their turn")
    a.add_argument("--adapter-negative-cache-seconds", type=_non_negative_float,
                   default=e["adapter_negative_cache_seconds"], help="how long an unknown name answers 404 from memory")
    a.add_argument("--adapter-negative-cache-size", type=_non_negative_int, default=e["adapter_negative_cache_size"],
                   help="names the negative cache holds (oldest go first)")
    a.add_argument("--max-dynamic-adapters", type=_positive_int, default=e["max_dynamic_adapters"],
                   help="registry rows kept for resolved names that hold no weights yet")
    a.add_argument("--adapter-catalog-url", default=None,
                   help="the operator's adapter catalog (http://<operator>:9091/catalog/v1/<namespace>/<base>): "
                        "unregistered names are looked up there (with the admin token) instead of the default "
                        "source, and served with their own source, sha256 and tenants; unknown there: 404")
    a.add_argument("--warm-start-budget-seconds", type=_non_negative_float, default=s["warm_start_budget_seconds"],
                   help="with --adapter-catalog-url and POD_NAME set: before reporting Ready, load the adapters the "
                        "operator placed on this pod, hottest first, for at most this long (0: off); the rest load "
                        "just in time")
    a.add_argument("--adapter-catalog-ttl-seconds", type=_non_negative_float,
                   default=e["adapter_catalog_ttl_seconds"],
                   help="how long an adapter fetched from the catalog is served before its manifest is checked again")
    a.add_argument("--max-active-adapters", type=_positive_int, default=e["max_active_adapters"],
                   help="device slots (a cap beside the device byte budget)")
    dev = a.add_mutually_exclusive_group()
    dev.add_argument("--adapter-device-bytes", type=_bytes, default=None,
                     help="device tier budget (e.g. 2GiB): slots = budget / bytes per slot at --max-lora-rank")
    dev.add_argument("--adapter-memory-fraction", type=_fraction, default=None,
                     help="device tier budget as a share of device memory (CPU: of RAM)")
    a.add_argument("--max-cpu-adapters", type=_positive_int, default=e["max_cpu_adapters"],
                   help="host-RAM copies (a cap beside --adapter-host-bytes)")
    a.add_argument("--adapter-host-bytes", type=_bytes, default=e["adapter_host_bytes"], help="host-RAM tier budget")
    a.add_argument("--adapter-disk-bytes", type=_bytes, default=None,
                   help="disk tier budget for Hub/S3 downloads under --adapter-cache-dir (default: unbounded)")
    a.add_argument("--adapter-merged-bytes", type=_bytes, default=e["adapter_merged_bytes"],
                   help="RAM for merged adapters (LoRAX merged_adapters), beside --adapter-host-bytes")
    a.add_argument("--max-concurrent-merges", type=_positive_int, default=e["max_concurrent_merges"],
                   help="merged_adapters built at once; more are answered 429 with Retry-After")
    a.add_argument("--adapter-wait-timeout-seconds", type=_positive_float, default=e["adapter_wait_timeout_seconds"],
                   help="a request whose adapter is still not loaded this long after it arrived gets 503")
    a.add_argument("--adapter-fairness-seconds", type=_non_negative_float, default=e["adapter_fairness_seconds"],
                   help="a request that waited this long for a device slot gets the next one that frees")
    a.add_argument("--max-lora-rank", type=_positive_int, default=e["max_lora_rank"])
    a.add_argument("--preload-adapters", default="", help="comma-separated adapters resident before /ready")
    a.add_argument("--adapter-manifest-file", default=None, help="JSON manifest list, watched and reconciled")
    a.add_argument("--inject-delay", type=parse_delay, action=DelayAction, default={}, metavar="KEY=SECONDS",
                   help="fault injection for rollout drills (repeatable): each request served by adapter KEY "
                        "(a revision, support@3, or a name) waits SECONDS (0 to 60) before it is scheduled, "
                        "counted in its TTFT; a warning is logged at start-up")
    sec = p.add_argument_group("security and limits")
    sec.add_argument("--api-keys-file", default=None,
                     help='JSON {"tenant": ["key", "pbkdf2_sha256$..."]} or {"tenant": {"keys": [...], "weight": 1, '
                          '"limits": {...}}}; see docs/api.md')
    sec.add_argument("--admin-token-file", default=None, help="file holding the admin bearer token")
    sec.add_argument("--metrics-token-file", default=None,
                     help="file holding a scraper's bearer token: with it (or the admin token) /metrics, /info "
                          "and /ready name restricted adapters; without, they show opaque ids")
    sec.add_argument("--max-body-bytes", type=_positive_int, default=s["max_body_bytes"])
    sec.add_argument("--allowed-origins", default="",
                     help="comma-separated browser origins (https://app.example.com) allowed to call this "
                          "server cross-site, with CORS; '*': any. Default: none (403)")
    sec.add_argument("--prepare-workers", type=_non_negative_int, default=s["prepare_workers"],
                     help="threads that template, tokenize and validate requests (0: on the event loop)")
    sec.add_argument("--grammar-timeout", type=_positive_float, default=s["grammar_timeout_seconds"],
                     help="seconds a structured-output grammar may take to compile and give its first token mask; "
                          "past it: 400 grammar_too_complex")
    sec.add_argument("--grammar-workers", type=_positive_int, default=s["grammar_workers"],
                     help="structured-output grammars compiled at once (each on a thread of its own)")
    sec.add_argument("--grammar-cache-bytes", type=_bytes, default=s["grammar_cache_bytes"],
                     help="budget for compiled grammars, cached or held by running requests")
    sec.add_argument("--max-adapter-metric-labels", type=_non_negative_int, default=s["max_adapter_metric_labels"],
                     help="distinct per-adapter metric label values; beyond: 'other'")
    sec.add_argument("--max-residency-metric-adapters", type=_non_negative_int,
                     default=s["max_residency_metric_adapters"],
                     help="loraplex_adapter_resident series (one per adapter in the device or host tier); beyond: "
                          "the most recently used, and loraplex_adapter_resident_truncated counts the rest")
    ten = p.add_argument_group("tenants and usage")
    ten.add_argument("--max-tenants", type=_positive_int, default=s["max_tenants"],
                     help="per-tenant state is kept for at most N tenants: quota buckets (least recently used idle "
                          "ones go first), and usage totals and metric labels of tenants an inference gateway names "
                          "(x-gateway-inference-fairness-id, without a keys file; beyond: 'other')")
    ten.add_argument("--usage-log", default=None,
                     help="file to append one JSON line per finished request to (rotated); default: none")
    ten.add_argument("--usage-log-max-bytes", type=_bytes, default=s["usage_log_max_bytes"],
                     help="--usage-log rotates at this size (e.g. 100MiB)")
    ten.add_argument("--usage-log-backups", type=_positive_int, default=s["usage_log_backups"],
                     help="rotated --usage-log files kept (PATH.1 is the newest)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--tool-call-parser", default=s["tool_call_parser"], choices=["auto", "hermes", "llama3_json"],
                   help="how tool calls are read from the output; auto: from the chat template")
    return p


def configs_from_args(args: argparse.Namespace):
    from loraplex.engine.core.config import EngineConfig

    config = EngineConfig(
        model_id=args.model_id, revision=args.revision, served_model_name=args.served_model_name,
        device=args.device, dtype=args.dtype, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_waiting=args.max_waiting, tenant_scheduling=args.tenant_scheduling, adapter_source=args.adapter_source, adapter_dir=args.adapter_dir,
        adapter_cache_dir=args.adapter_cache_dir, max_active_adapters=args.max_active_adapters,
        max_cpu_adapters=args.max_cpu_adapters, max_lora_rank=args.max_lora_rank,
        adapter_s3_prefix=args.adapter_s3_prefix, dynamic_adapters=args.dynamic_adapters,
        max_concurrent_adapter_loads=args.max_concurrent_adapter_loads,
        adapter_negative_cache_seconds=args.adapter_negative_cache_seconds,
        adapter_negative_cache_size=args.adapter_negative_cache_size,
        max_dynamic_adapters=args.max_dynamic_adapters, adapter_catalog_url=args.adapter_catalog_url,
        adapter_catalog_token_file=args.admin_token_file if args.adapter_catalog_url else None,
        adapter_catalog_ttl_seconds=args.adapter_catalog_ttl_seconds, adapter_device_bytes=args.adapter_device_bytes,
        adapter_memory_fraction=args.adapter_memory_fraction, adapter_host_bytes=args.adapter_host_bytes,
        adapter_disk_bytes=args.adapter_disk_bytes, adapter_fairness_seconds=args.adapter_fairness_seconds,
        adapter_merged_bytes=args.adapter_merged_bytes, max_concurrent_merges=args.max_concurrent_merges,
        adapter_wait_timeout_seconds=args.adapter_wait_timeout_seconds,
        preload_adapters=[n.strip() for n in args.preload_adapters.split(",") if n.strip()],
        num_threads=args.num_threads, enable_prefix_caching=args.enable_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size, tensor_parallel_timeout=args.tensor_parallel_timeout,
    )
    settings = ServerSettings(
        api_keys_file=args.api_keys_file, admin_token_file=args.admin_token_file,
        metrics_token_file=args.metrics_token_file,
        adapter_manifest_file=args.adapter_manifest_file, max_adapter_metric_labels=args.max_adapter_metric_labels,
        max_body_bytes=args.max_body_bytes, prepare_workers=args.prepare_workers,
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
        tool_call_parser=args.tool_call_parser, grammar_timeout_seconds=args.grammar_timeout,
        grammar_workers=args.grammar_workers, grammar_cache_bytes=args.grammar_cache_bytes,
        max_tenants=args.max_tenants, usage_log=args.usage_log, usage_log_max_bytes=args.usage_log_max_bytes,
        usage_log_backups=args.usage_log_backups, max_residency_metric_adapters=args.max_residency_metric_adapters,
        warm_start_budget_seconds=args.warm_start_budget_seconds, inject_delay=dict(args.inject_delay),
        pod_name=os.environ.get("POD_NAME") or None,  # the downward API's metadata.name
    )
    return config, settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from loraplex.engine.api.app import create_app
    from loraplex.engine.core.async_engine import AsyncEngine
    from loraplex.engine.core.llm_engine import LLMEngine

    config, settings = configs_from_args(args)
    warn_if_set(settings.inject_delay)
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    settings.on_fatal = on_fatal
    try:
        app = create_app(lambda: AsyncEngine(LLMEngine(config)), settings)
    except ValueError as exc:  # unreadable key/token files, a usage log that cannot be opened
        print(f"loraplex-engine: {exc}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           lifespan="on", timeout_graceful_shutdown=5, access_log=False))
    server.run()
    if failed and config.tensor_parallel_size > 1:
        # The step thread may still be blocked in a collective or a device sync of the broken
        # group, and interpreter shutdown could wait on it: leave now (the logs are all that
        # is left to flush).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
