"""What callers without credentials see of restricted adapters (those whose manifest lists
`tenants`) on the routes that need none: /metrics (the `adapter` label and vLLM's
`running_lora_adapters` / `waiting_lora_adapters`), /info (the manifest file's names) and
/ready (preload adapters not resident yet).

A restricted adapter's name is one tenant's business: to a caller without the admin or the
metrics token (`Authenticator.may_see_names`) it shows as `restricted-<12 hex>`, an HMAC of
the name. Tenant names (the `tenant` label of the `loraplex_tenant_*` metrics) are shown the
same way, as `tenant-<12 hex>`, except `default`, `admin` and `other`, which name no customer. The HMAC key is derived from the admin token, so the pods of one deployment give
an adapter the same id (dashboards that sum over pods still see one series per adapter), and
nobody without the token can test a guessed name against an id. A name the engine no longer
knows counts as restricted (it may have been).
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Callable

from fastapi import Request

from loraplex.engine.core.adapters.sources import registry_name

PREFIX = "restricted-"
TENANT_PREFIX = "tenant-"
PLAIN_TENANTS = ("default", "admin", "other")

Redact = Callable[[str], str]


def redactor(request: Request, state, keep: tuple[str, ...] = ()) -> Redact | None:
    """None when the caller may see every name; else name -> what it may see. `keep`: labels
    that are not adapter names (the base model, `unknown`, `other`)."""
    auth = state.auth
    if auth.may_see_names(request) or state.engine is None:
        return None
    key = hashlib.sha256(b"loraplex adapter label\0" + auth.admin.value.encode()).digest()
    mgr = state.engine.adapters
    seen: dict[str, str] = {}

    def redact(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in seen:
            # Dynamic Hub adapters go by the name requests use (org/name) in the router view.
            entry = mgr.get(name) or mgr.get(registry_name(name))
            open_ = entry is not None and not entry["manifest"].get("tenants")
            seen[name] = name if open_ else PREFIX + hmac.new(key, name.encode(), "sha256").hexdigest()[:12]
        return seen[name]

    return redact


def tenant_redactor(request: Request, state) -> Redact | None:
    """None when the caller may see tenant names; else tenant -> `tenant-<12 hex>`."""
    auth = state.auth
    if auth.may_see_names(request):
        return None
    key = hashlib.sha256(b"loraplex tenant label\0" + auth.admin.value.encode()).digest()

    def redact(tenant: str) -> str:
        if not tenant or tenant in PLAIN_TENANTS:
            return tenant
        return TENANT_PREFIX + hmac.new(key, tenant.encode(), "sha256").hexdigest()[:12]

    return redact


def redact_list(names: list[str], redact: Redact | None) -> list[str]:
    return list(names) if redact is None else [redact(n) for n in names]


# The labels of /metrics that carry adapter names (one name, or vLLM's comma-separated lists).
NAME_LABELS = ("adapter",)
LIST_LABELS = ("running_lora_adapters", "waiting_lora_adapters")


class RedactedRegistry:
    """A registry's samples with adapter names redacted, for prometheus_client's
    generate_latest (which needs only `collect`). Families are built afresh at each collect, so
    relabelling them leaves the registry as it was."""

    def __init__(self, registry, redact: Redact, redact_tenant: Redact | None = None):
        self.registry = registry
        self.redact = redact
        self.redact_tenant = redact_tenant

    def _labels(self, labels: dict) -> dict:
        out = dict(labels)
        for k in NAME_LABELS:
            if k in out:
                out[k] = self.redact(out[k])
        if self.redact_tenant is not None and "tenant" in out:
            out["tenant"] = self.redact_tenant(out["tenant"])
        for k in LIST_LABELS:
            if out.get(k):
                out[k] = ",".join(sorted(self.redact(n) for n in out[k].split(",")))
        return out

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s._replace(labels=self._labels(s.labels)) for s in family.samples]
            yield family
