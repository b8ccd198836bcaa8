"""Which model a request names: the base, a registered adapter, or an adapter found by name in
the default source (just in time), checked against the caller's tenant. Everything goes through
the engine's public adapter interface (`AsyncEngine.adapters`)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from loraplex.engine.api.auth import Authenticator, Principal
from loraplex.engine.api.errors import APIError
from loraplex.engine.core.adapters.sources import registry_name
from loraplex.engine.core.async_engine import AsyncEngine
from loraplex.engine.core.errors import AdapterLoadTimeoutError, UnknownAdapterError
from loraplex.manifest import manifest_digest


@dataclass(frozen=True)
class ServedModel:
    adapter: str | None  # the registered adapter name; None: the base model
    name: str  # the name as requested, echoed back in responses
    revision: str | None = None  # the adapter's manifest digest (what is served under the name), for usage records


async def resolve_model(engine: AsyncEngine, auth: Authenticator, principal: Principal, name: str | None,
                        param: str = "model") -> ServedModel:
    """Map a requested name to the base or an adapter the caller may use. An unregistered name
    is looked up in the default source (--adapter-source) when --dynamic-adapters allows it
    (docs/api.md "Adapters by name"), registered and its load started. Another tenant's adapter
    answers exactly as a missing one (404)."""
    if engine.is_base(name):
        return ServedModel(None, engine.served_model_name)
    mgr = engine.adapters
    manifest = mgr.manifest(name)
    if manifest is None and mgr.dynamic != "off":
        if mgr.dynamic == "admin" and not auth.may_register(principal):
            raise APIError(404, f"the model {name!r} does not exist (loading adapters by name needs the admin "
                           "token on this server)", code="model_not_found", param=param)
        await wait_for_adapter(engine, asyncio.wrap_future(mgr.resolve(name)), name, param)
        manifest = mgr.manifest(name)
    if manifest is None:
        raise UnknownAdapterError(f"the model {name!r} does not exist", param=param)
    Authenticator.check_adapter(principal, manifest, name, param=param)
    return ServedModel(manifest.name, name, manifest_digest(manifest))


async def wait_for_adapter(engine: AsyncEngine, work, what: str, param: str = "model"):
    """Await an adapter's resolution or merge for at most --adapter-wait-timeout-seconds, then
    503 `adapter_load_timeout` (with Retry-After). The work itself goes on (shielded): other
    requests for the same name share it, and a retry finds it done."""
    timeout = engine.config.adapter_wait_timeout_seconds
    try:
        return await asyncio.wait_for(asyncio.shield(work), timeout)
    except asyncio.TimeoutError:
        raise AdapterLoadTimeoutError(f"adapter {what!r} was not ready within {timeout:g} s "
                                      "(--adapter-wait-timeout-seconds); retry later", param=param) from None


def adapter_name_for(adapter_id: str) -> str:
    """adapter_id itself when it is a valid adapter name (a DNS-1123 label), else
    `<slug>-<first 8 hex of its sha256>`: Hub ids like `org/name` get a stable name."""
    return registry_name(adapter_id)


def aborted_error(engine: AsyncEngine, adapter: str | None, error: str | None, code: str | None = None) -> APIError:
    """The error for a request the engine aborted (RequestOutput.error set; `code` its error_code)."""
    if code == AdapterLoadTimeoutError.code:
        return APIError.from_request_error(AdapterLoadTimeoutError(error or "adapter load timed out", param="model"))
    if adapter is not None and engine.adapters.failure(adapter) is not None:
        return APIError(424, error or f"adapter {adapter!r} failed to load", code="adapter_failed", param="model")
    return APIError(500, error or "the request was aborted by the engine", code="internal_error")
