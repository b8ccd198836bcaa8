"""Adapter administration: the manifest API (the operator's) and vLLM's load/unload routes.

All need `Authorization: Bearer <admin token>` when --admin-token-file is set.

At catalog scale (10,000 adapters on a pod) the per-request HTTP overhead, not the registration,
is what costs: `POST /v1/adapters:batch` registers many manifests in one request, and
`GET /v1/adapters?view=compact` lists name, state and manifest digest only.
"""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError

from loraplex.engine.api.errors import APIError, as_api_error
from loraplex.engine.api.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from loraplex.engine.api.state import ServerState, get_state
from loraplex.engine.core.errors import RequestError
from loraplex.manifest import AdapterManifest, AdapterState

router = APIRouter()
MAX_BATCH = 1000  # manifests per POST /v1/adapters:batch (the body cap, --max-body-bytes, applies too)


def _admin(request: Request) -> tuple[ServerState, object]:
    state = get_state(request)
    state.auth.require_admin(request)
    return state, state.require_engine().adapters


def _manifest(data: dict, param_prefix: str = "") -> AdapterManifest:
    try:
        return AdapterManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        msg = first.get("msg", "invalid manifest")
        raise APIError(400, f"invalid adapter manifest: {loc + ': ' if loc else ''}{msg}",
                       code="invalid_manifest", param=(param_prefix + loc) or None) from None


def _not_found(name: str) -> APIError:
    return APIError(404, f"adapter {name!r} is not registered", code="adapter_not_found", param="name")


# ---- manifest API ----------------------------------------------------------------------------

@router.get("/v1/adapters")
async def list_adapters(request: Request, view: str = "full"):
    """Every adapter, by name. `view=compact`: name, state, message, dynamic and manifest_digest
    only (what the operator diffs a pod by). Rendered straight to JSON (the rows are plain JSON
    already; FastAPI's encoder would walk all of them again)."""
    _, mgr = _admin(request)
    if view not in ("full", "compact"):
        raise APIError(400, f"view must be 'full' or 'compact', got {view!r}", code="invalid_value", param="view")
    return JSONResponse({"object": "list", "data": mgr.list(compact=view == "compact")})


@router.post("/v1/adapters:batch")
async def put_adapters(request: Request, body: dict = Body(...)):
    """Register or update many adapters at once: `{"adapters": [manifest, ...]}` (each as PUT
    /v1/adapters/{name} takes it, with its name). Answers 200 with one row per manifest, in
    order: the adapter's state, or `{"name", "status", "error": {...}}` for one refused (the others
    still go in)."""
    _, mgr = _admin(request)
    items = body.get("adapters")
    if not isinstance(items, list):
        raise APIError(400, "the body must be {\"adapters\": [manifest, ...]}", code="invalid_value", param="adapters")
    if len(items) > MAX_BATCH:
        raise APIError(400, f"at most {MAX_BATCH} manifests per batch, got {len(items)}", code="invalid_value",
                       param="adapters")
    seen: set[str] = set()
    for name in map(_name_of, items):
        if name in seen:
            raise APIError(400, f"adapter {name!r} appears twice in the batch", code="invalid_value",
                           param="adapters")
        if name is not None:
            seen.add(name)
    # Off the event loop: a batch takes a while, and inference streams must go on meanwhile.
    rows = await asyncio.to_thread(_register_each, mgr, items)
    return JSONResponse({"object": "list", "data": rows})


def _name_of(item) -> str | None:
    name = item.get("name") if isinstance(item, dict) else None
    return name if isinstance(name, str) else None


def _register_each(mgr, items: list) -> list[dict]:
    rows = []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise APIError(400, "a manifest must be a JSON object", code="invalid_manifest",
                               param=f"adapters.{i}")
            rows.append(mgr.register(_manifest(item, f"adapters.{i}.")))
        except (APIError, RequestError) as exc:
            err = as_api_error(exc)
            rows.append({"name": _name_of(item), "status": err.status, **err.body()})
    return rows


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, request: Request):
    _, mgr = _admin(request)
    described = mgr.get(name)
    if described is None:
        raise _not_found(name)
    return described


@router.put("/v1/adapters/{name}")
async def put_adapter(name: str, request: Request, body: dict = Body(...)):
    """Register or update an adapter from its manifest; idempotent. Returns its state."""
    _, mgr = _admin(request)
    if body.get("name") is None:
        body = {**body, "name": name}
    elif body["name"] != name:
        raise APIError(400, f"the manifest's name {body['name']!r} differs from the path's {name!r}",
                       code="name_mismatch", param="name")
    return mgr.register(_manifest(body))  # RequestError (preload slots) -> 400


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, request: Request):
    _, mgr = _admin(request)
    if not mgr.unregister(name):
        raise _not_found(name)
    return {"name": name, "deleted": True}


# ---- vLLM-compatible -------------------------------------------------------------------------

@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request):
    """Register `lora_name` from the local folder `lora_path` and load it (as vLLM does). A
    load that fails is unregistered again and answered with 400 and the reason."""
    state, mgr = _admin(request)
    manifest = _manifest({"name": body.lora_name, "source": "local", "uri": body.lora_path})
    previous = mgr.manifest(manifest.name)
    mgr.register(manifest)
    mgr.request_load(manifest.name)
    deadline = time.monotonic() + state.settings.adapter_load_wait_seconds
    while True:
        described = mgr.get(manifest.name)
        if described is None:
            raise APIError(409, f"adapter {manifest.name!r} was unregistered while loading", code="conflict")
        if described["state"] in (AdapterState.HOST.value, AdapterState.DEVICE.value):
            break
        if described["state"] == AdapterState.FAILED.value:
            if previous is None:
                mgr.unregister(manifest.name)
            raise APIError(400, f"loading LoRA adapter {manifest.name!r} failed: {described['message']}",
                           code="adapter_load_failed", param="lora_path")
        if time.monotonic() > deadline:
            break  # still loading: it stays registered and finishes in the background
        await asyncio.sleep(0.02)
    return PlainTextResponse(f"Success: LoRA adapter '{manifest.name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request):
    _, mgr = _admin(request)
    if not mgr.unregister(body.lora_name):
        raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", code="adapter_not_found",
                       param="lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
