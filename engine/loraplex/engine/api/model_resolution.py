"""Which model a request names: the base, a registered adapter, or an adapter found by name in
the default source (just in time), checked against the caller's tenant; for an adapter served by
revisions, which revision serves this request (sticky by session, weighted random, or pinned as
`<name>@<number>`: docs/api.md "Adapter revisions"). Everything goes through the engine's public
adapter interface (`AsyncEngine.adapters`)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from loraplex.engine.api.auth import Authenticator, Principal
from loraplex.engine.api.errors import APIError
from loraplex.engine.core.adapters.sources import registry_name
from loraplex.engine.core.async_engine import AsyncEngine
from loraplex.engine.core.errors import AdapterLoadTimeoutError, UnknownAdapterError
from loraplex.manifest import AdapterManifest, manifest_digest, split_revision

SESSION_HEADER = "x-session-id"  # sticks a session to one revision (else the OpenAI `user` field)


@dataclass(frozen=True)
class ServedModel:
    adapter: str | None  # the registry key that serves it (`<name>@<n>` for a revision); None: the base model
    name: str  # the name as requested, echoed back in responses
    digest: str | None = None  # manifest digest of what serves it (the revision's own), for usage records
    adapter_name: str | None = None  # the adapter's name (`x` for `x@2`): metric labels, usage records
    revision: int | None = None  # the adapter revision serving it; None: not a revisioned adapter


async def resolve_model(engine: AsyncEngine, auth: Authenticator, principal: Principal, name: str | None,
                        param: str = "model", session: str | None = None) -> ServedModel:
    """Map a requested name to the base or an adapter the caller may use. An unregistered name
    is looked up in the default source (--adapter-source) when --dynamic-adapters allows it
    (docs/api.md "Adapters by name"), registered and its load started. Another tenant's adapter
    answers exactly as a missing one (404). A revisioned adapter picks its revision here:
    `session` (x-session-id, else `user`) sticks, `<name>@<n>` pins."""
    if engine.is_base(name):
        return ServedModel(None, engine.served_model_name)
    mgr = engine.adapters
    adapter, pinned = split_revision(name)
    if pinned is not None:
        return await _pinned(engine, auth, principal, name, adapter, pinned, param)
    manifest = await _find(engine, auth, principal, name, param)
    revisions = mgr.revision_set(manifest.name) if manifest.revisions is not None else None
    if revisions is not None:
        r = revisions.choose(session)
        return ServedModel(r.key, name, r.digest, manifest.name, r.number)
    adapter, number = split_revision(manifest.name)  # `name` may be an alias of a revision's files
    return ServedModel(manifest.name, name, manifest_digest(manifest), adapter, number)


async def _find(engine: AsyncEngine, auth: Authenticator, principal: Principal, name: str, param: str,
                dynamic: bool = True) -> AdapterManifest:
    """The manifest serving `name`, found just in time when allowed; 404 unless the caller may use it."""
    mgr = engine.adapters
    manifest = mgr.manifest(name)
    if manifest is None and dynamic and mgr.dynamic != "off":
        if mgr.dynamic == "admin" and not auth.may_register(principal):
            raise APIError(404, f"the model {name!r} does not exist (loading adapters by name needs the admin "
                           "token on this server)", code="model_not_found", param=param)
        await wait_for_adapter(engine, asyncio.wrap_future(mgr.resolve(name)), name, param)
        manifest = mgr.manifest(name)
    if manifest is None:
        raise UnknownAdapterError(f"the model {name!r} does not exist", param=param)
    Authenticator.check_adapter(principal, manifest, name, param=param)
    return manifest


async def _pinned(engine: AsyncEngine, auth: Authenticator, principal: Principal, name: str, adapter: str,
                  number: int, param: str) -> ServedModel:
    """`<adapter>@<number>`: that revision, at any percent, if the adapter serves it. Only the
    operator's catalog knows revisions of names not registered here (the default source does not)."""
    mgr = engine.adapters
    try:
        manifest = await _find(engine, auth, principal, adapter, param, dynamic=mgr.catalog is not None)
    except UnknownAdapterError:
        raise UnknownAdapterError(f"the model {name!r} does not exist", param=param) from None
    revisions = mgr.revision_set(adapter) if manifest.revisions is not None else None
    r = revisions.get(number) if revisions is not None else None
    if r is None:
        served = (f": {adapter!r} serves revisions {', '.join(str(n.number) for n in reversed(revisions.revisions))}"
                  if revisions is not None else f" ({adapter!r} has no revisions)")
        raise UnknownAdapterError(f"the model {name!r} does not exist{served}", param=param)
    return ServedModel(r.key, name, r.digest, adapter, r.number)


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
