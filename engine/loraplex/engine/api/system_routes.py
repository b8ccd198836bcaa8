"""Probes and introspection: /health, /ready, /info, /metrics (no auth: kubelet and Prometheus).
Restricted adapters' names show only to callers with the admin or metrics token (redaction.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loraplex.engine.api.errors import APIError
from loraplex.engine.api.metrics import OTHER, UNKNOWN
from loraplex.engine.api.redaction import RedactedRegistry, redact_list, redactor, tenant_redactor
from loraplex.engine.api.state import get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    """Liveness: 200 while the process serves (the model may still be loading); 503 when the
    engine failed to start or its step loop died, so that the kubelet restarts the pod."""
    state = get_state(request)
    if state.load_error:
        return JSONResponse(APIError(503, f"the engine failed to start: {state.load_error}",
                                     code="engine_failed").body(), status_code=503)
    if state.engine is not None and not state.engine.is_alive:
        reason = state.engine.failure or "the engine's step loop has stopped"
        return JSONResponse(APIError(503, reason, code="engine_dead").body(), status_code=503)
    return {"status": "ok", "model_loaded": state.engine is not None}


@router.get("/ready")
async def ready(request: Request):
    """Readiness: 200 once the model is loaded, every preload adapter is on the device, and the
    warm start (the adapters placed on this pod) has ended or spent its budget."""
    state = get_state(request)
    if state.engine is None or not state.engine.is_alive:
        reason = state.load_error or ("the model is still loading" if state.engine is None else "the step loop stopped")
        body = APIError(503, f"not ready: {reason}", code="not_ready").body()
        body.update({"status": "not_ready", "model_loaded": False, "missing_preload_adapters": []})
        return JSONResponse(body, status_code=503)
    mgr = state.engine.adapters
    ok, missing = mgr.preload_ready()
    if not ok:
        redact = redactor(request, state) or (lambda name: name)
        details = {}
        for name in missing:
            d = mgr.get(name)
            if d is not None:
                shown = redact(name)  # a restricted adapter's message may name it or its files
                details[shown] = {"state": d["state"], "message": d["message"] if shown == name else None}
        missing = [redact(n) for n in missing]
        body = APIError(503, f"not ready: preload adapters not resident yet: {', '.join(missing)}",
                        code="not_ready").body()
        body.update({"status": "not_ready", "model_loaded": True, "missing_preload_adapters": missing,
                     "adapters": details})
        return JSONResponse(body, status_code=503)
    warm = state.warm_start
    if warm is not None and warm.holds_ready():
        view = warm.view()
        progress = (f"{view['resident']} of {view['listed']} placed adapters resident" if view["state"] == "loading"
                    else "asking the adapter catalog which adapters are placed on this pod")
        body = APIError(503, f"not ready: warm start in progress: {progress}", code="not_ready").body()
        body.update({"status": "warming", "model_loaded": True, "missing_preload_adapters": [], "warm_start": view})
        return JSONResponse(body, status_code=503)
    return {"status": "ready", "model_loaded": True, "missing_preload_adapters": []}


@router.get("/info")
async def info(request: Request):
    state = get_state(request)
    engine = state.require_engine()
    cfg = engine.config
    stats = engine.stats()
    facts = engine.describe()
    watcher = state.watcher
    manifest_file = None if watcher is None else {
        "path": str(watcher.path), "versions_applied": watcher.generation, "error": watcher.last_error,
        "adapters": sorted(redact_list(watcher.names, redactor(request, state)))}
    return {
        "model_id": cfg.model_id,
        "revision": cfg.revision,
        "served_model_name": engine.served_model_name,
        "architecture": facts["architecture"],
        "dtype": facts["dtype"],
        "device": facts["device"],
        "block_size": cfg.block_size,
        "max_lora_rank": cfg.max_lora_rank,
        "adapter_slots": facts["adapter_slots"],  # after the device byte budget
        "max_cpu_adapters": cfg.max_cpu_adapters,
        "max_model_len": engine.max_model_len,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "num_blocks": stats["num_blocks"],
        "num_free_blocks": stats["num_free_blocks"],
        "enable_prefix_caching": cfg.enable_prefix_caching,
        # Each rank holds 1/N of the weights and KV heads; weight_bytes below is rank 0's share.
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "tensor_parallel_worker_pids": facts["tensor_parallel_worker_pids"],
        # Base weights in memory, and what they would take unquantized (equal for a full base).
        "quantization": facts["quantization"],
        "weight_bytes": facts["weight_bytes"],
        "weight_bytes_unquantized": facts["weight_bytes_unquantized"],
        "num_requests_running": stats["num_requests_running"],
        "num_requests_waiting": stats["num_requests_waiting"],
        "version": state.settings.version,
        "boot_id": engine.boot_id,
        "manifest_file": manifest_file,
        # budget_seconds, listed, resident, seconds (until Ready was allowed), timed_out, ...
        "warm_start": state.warm_start.view() if state.warm_start is not None else None,
    }


@router.get("/metrics")
async def metrics(request: Request):
    state = get_state(request)
    redact = redactor(request, state, keep=(state.metrics.base_label, UNKNOWN, OTHER))
    view = None if redact is None else (
        lambda registry: RedactedRegistry(registry, redact, tenant_redactor(request, state)))
    return Response(state.metrics.render(view), media_type=CONTENT_TYPE_LATEST)
