"""Operator tunables, read from the environment (the Helm chart sets them; tests shrink them)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields


def _env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"{name} must be a number, got {raw!r}") from e


@dataclass(frozen=True)
class OperatorConfig:
    # Level-triggered resync of every object even when no event arrives.
    resync_interval: float = 30.0
    # Poll interval while some pod reports `loading` for an adapter.
    poll_interval: float = 2.0
    # Retries of a failing adapter per pod: backoff = min(base * 2**(n-1), max).
    backoff_base: float = 2.0
    backoff_max: float = 120.0
    max_failures: int = 5
    # Engine HTTP timeouts (seconds).
    engine_timeout: float = 30.0
    engine_connect_timeout: float = 3.0
    # Deletion of a LoraAdapter: unload attempts before giving up on unreachable pods.
    unload_attempts: int = 3
    unload_retry_delay: float = 5.0
    # Autoscaling timer interval.
    autoscale_interval: float = 15.0
    # Bounded concurrency of one pass: pods worked on at once, adapter pushes in flight at once
    # (over all pods), status writes in flight at once.
    # Least time between two passes over a base: its own status writes echo back as watch
    # events that wake it; they are taken together instead of one pass each.
    min_pass_interval: float = 0.5
    pod_concurrency: int = 16
    push_concurrency: int = 32
    # Manifests per POST /v1/adapters:batch, and about how many bytes of JSON (the engine's
    # --max-body-bytes is 1 MiB by default).
    push_batch_size: int = 200
    push_batch_bytes: int = 256 * 1024
    status_concurrency: int = 16
    # Leader election (a coordination.k8s.io/v1 Lease `loraplex-operator` in POD_NAMESPACE).
    lease_duration: float = 15.0
    lease_renew_deadline: float = 10.0
    lease_retry_period: float = 2.0
    # The adapter catalog (catalog.py, catalog_auth.py): how often each replica re-reads the
    # bases and their admin tokens it authenticates callers with, and each caller's token
    # bucket (requests a second, burst).
    catalog_refresh_interval: float = 5.0
    catalog_rate: float = 20.0
    catalog_burst: int = 100

    @classmethod
    def from_env(cls) -> "OperatorConfig":
        values = {}
        for f in fields(cls):
            env = "LORAPLEX_" + f.name.upper()
            default = getattr(cls, f.name)
            v = _env(env, float(default))
            values[f.name] = int(v) if isinstance(default, int) else v
        cfg = cls(**values)
        if cfg.max_failures < 1 or cfg.unload_attempts < 1:
            raise ValueError("LORAPLEX_MAX_FAILURES and LORAPLEX_UNLOAD_ATTEMPTS must be >= 1")
        if min(cfg.pod_concurrency, cfg.push_concurrency, cfg.status_concurrency) < 1:
            raise ValueError("LORAPLEX_*_CONCURRENCY must be >= 1")
        if cfg.push_batch_size < 1 or cfg.push_batch_bytes < 1:
            raise ValueError("LORAPLEX_PUSH_BATCH_SIZE and LORAPLEX_PUSH_BATCH_BYTES must be >= 1")
        if cfg.catalog_refresh_interval <= 0 or cfg.catalog_rate <= 0 or cfg.catalog_burst < 1:
            raise ValueError("LORAPLEX_CATALOG_REFRESH_INTERVAL and LORAPLEX_CATALOG_RATE must be > 0, "
                             "LORAPLEX_CATALOG_BURST >= 1")
        return cfg


def catalog_url_from_env() -> str | None:
    """Where engines reach the operator's adapter catalog (LORAPLEX_CATALOG_URL, e.g.
    http://loraplex.loraplex-system.svc:9091; the chart sets it to its Service). Unset: engines
    get no --adapter-catalog-url (an unplaced pod then answers 404 for adapters it was not given)."""
    url = os.environ.get("LORAPLEX_CATALOG_URL", "").strip().rstrip("/")
    return url or None


# The namespaces the operator watches, set by `loraplex-operator` (cli.main) from its command line
# before kopf starts; None: all of them.
WATCHED_NAMESPACES: tuple[str, ...] | None = None


def watch_namespaces(argv: list[str]) -> tuple[str, ...] | None:
    """The namespaces kopf watches, from its command line (`--namespace X`, `--namespace=X`,
    `-n X`, repeated); None for all of them (`-A`, no flag, or a glob/negation pattern, which
    only a cluster-wide read can follow). The adapter catalog lists bases there (catalog_auth.py)."""
    names: list[str] = []
    args = iter(argv)
    for a in args:
        if a in ("-A", "--all-namespaces"):
            return None
        if a in ("-n", "--namespace"):
            names.append(next(args, ""))
        elif a.startswith("--namespace="):
            names.append(a.split("=", 1)[1])
        elif a.startswith("-n") and not a.startswith("--"):
            names.append(a[2:])
    if not names or any(not n or n.startswith("!") or re.search(r"[*?\[]", n) for n in names):
        return None
    return tuple(dict.fromkeys(names))


DEFAULT_ENGINE_IMAGE_PREFIXES = ("ghcr.io/loraplex/",)


def engine_image_prefixes_from_env() -> tuple[str, ...]:
    """Where BaseModelDeployment engine images may come from (LORAPLEX_ENGINE_IMAGE_PREFIXES,
    comma-separated; the chart sets it from engineImages.allowedPrefixes). Default: the
    project's own repository. See podpolicy.check_image."""
    raw = os.environ.get("LORAPLEX_ENGINE_IMAGE_PREFIXES")
    if raw is None:
        return DEFAULT_ENGINE_IMAGE_PREFIXES
    return tuple(p.strip() for p in raw.split(",") if p.strip())
