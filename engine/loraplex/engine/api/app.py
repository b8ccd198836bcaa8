"""The FastAPI app: `create_app(engine_or_factory, settings)`.

Given a factory (what the CLI passes), the app answers /health at once and builds the engine on
a worker thread; /ready and inference routes answer 503 until it is up. Given an AsyncEngine,
it is set up before the first request. Set-up = start the step loop, register
--preload-adapters, reconcile the manifest file once, start the warm start (its own thread:
/ready answers 503 until it ends, core/adapters/warm_start.py); then a background task polls the
manifest file and the key/token files about once a second. Shutdown stops that task and the
engine, and flushes the usage sinks.

Tenancy lives on ServerState: `quotas` (quotas.QuotaLimiter) and `usage` (usage.UsageMeter),
which the request lifecycle calls; GET /v1/usage reads the meter.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware

from loraplex.engine.api import (admin_routes, lorax_routes, openai_routes, responses_routes, system_routes, tracing,
                                 usage_routes)
from loraplex.engine.api.auth import Authenticator
from loraplex.engine.api.errors import install_error_handlers
from loraplex.engine.api.manifest_watcher import ManifestWatcher
from loraplex.engine.api.metrics import UNKNOWN
from loraplex.engine.api.middleware import BodyLimitMiddleware, RequestGuardMiddleware
from loraplex.engine.api.model_resolution import adapter_name_for
from loraplex.engine.api.quotas import QuotaLimiter
from loraplex.engine.api.state import ServerState
from loraplex.engine.api.settings import ServerSettings
from loraplex.engine.api.usage import create_usage_meter
from loraplex.engine.core.adapters.warm_start import WarmStart
from loraplex.engine.core.async_engine import AsyncEngine
from loraplex.manifest import AdapterManifest

log = logging.getLogger("loraplex.engine.api")
INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/generate",
                             "/generate_stream", "/"})

EngineSource = AsyncEngine | Callable[[], AsyncEngine]


def preload_manifests(names: list[str], source: str) -> list[AdapterManifest]:
    """--preload-adapters a,b: each a path under --adapter-dir (or a Hub repo / S3 uri, per
    --adapter-source), registered with preload=True under adapter_name_for(name)."""
    return [AdapterManifest(name=adapter_name_for(n), source=source, uri=n, preload=True) for n in names if n]


async def _bring_up(state: ServerState, source: EngineSource) -> None:
    settings = state.settings
    try:
        engine = source if isinstance(source, AsyncEngine) else await asyncio.to_thread(source)
        if not engine.is_alive:
            engine.start()
        cfg = engine.config
        mgr = engine.adapters
        for manifest in preload_manifests(cfg.preload_adapters, cfg.adapter_source):
            mgr.register(manifest)
        if settings.adapter_manifest_file:
            state.watcher = ManifestWatcher(settings.adapter_manifest_file, mgr, settings.watch_interval_seconds)
            await asyncio.to_thread(state.watcher.poll)
        state.metrics.base_label = engine.served_model_name
        # Before the engine is published: /ready must never see it up without its warm start.
        state.warm_start = WarmStart(mgr, settings.pod_name, settings.warm_start_budget_seconds)
        state.warm_start.start()
        state.engine = engine
        log.info("engine ready: %s on %s (boot %s)", engine.served_model_name, engine.device,
                 engine.boot_id)
    except Exception as exc:
        log.exception("the engine could not be started")
        state.load_error = f"{type(exc).__name__}: {exc}"
        if settings.on_fatal is not None:
            settings.on_fatal(exc)


DEAD_POLL_SECONDS = 0.5


async def _exit_when_dead(state: ServerState) -> None:
    """An engine that stopped for good (its step loop died, or a tensor-parallel worker did) takes
    the server down: on_fatal makes the CLI exit 1 and the kubelet restart the pod. Until the
    exit, /health and the inference routes answer 503."""
    while state.engine.is_alive:
        await asyncio.sleep(DEAD_POLL_SECONDS)
    reason = state.engine.failure or "the engine's step loop stopped"
    log.error("engine dead: %s; shutting the server down", reason)
    if state.settings.on_fatal is not None:
        state.settings.on_fatal(RuntimeError(reason))


async def _watch(state: ServerState) -> None:
    """Poll the manifest file and the key/token files."""
    while True:
        await asyncio.sleep(state.settings.watch_interval_seconds)
        try:
            await asyncio.to_thread(state.auth.reload)
            if state.watcher is not None:
                await asyncio.to_thread(state.watcher.poll)
        except Exception:  # the watcher must not die
            log.exception("file watcher error")


def create_app(engine: EngineSource, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    auth = Authenticator(settings.api_keys_file, settings.admin_token_file,  # bad files: ValueError now
                         settings.metrics_token_file)
    state = ServerState(settings, auth)
    state.quotas = QuotaLimiter(settings.max_tenants)
    state.usage = create_usage_meter(settings, state.metrics, auth)  # a usage log that cannot be opened: ValueError now

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks: list[asyncio.Task] = []
        bring_up = asyncio.create_task(_bring_up(state, engine))
        tasks.append(bring_up)
        if isinstance(engine, AsyncEngine):
            await bring_up  # nothing slow: be set up before the first request

        async def watch_when_up():
            await bring_up
            if state.engine is not None:
                await _watch(state)

        tasks.append(asyncio.create_task(watch_when_up()))

        async def exit_when_dead():
            await bring_up
            if state.engine is not None:
                await _exit_when_dead(state)

        tasks.append(asyncio.create_task(exit_when_dead()))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            if state.warm_start is not None:
                state.warm_start.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if state.prepare_pool is not None:
                state.prepare_pool.shutdown(wait=False, cancel_futures=True)
            if getattr(state, "grammar_compiler", None) is not None:
                state.grammar_compiler[1].shutdown()
            if state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)
            await asyncio.to_thread(tracing.shutdown, tracer_provider)
            await asyncio.to_thread(state.usage.close)

    app = FastAPI(title="loraplex engine", version=settings.version, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)

    # Malformed inference requests still count in loraplex_requests_total.
    validation_handler = app.exception_handlers[RequestValidationError]

    async def counted_validation_error(request: Request, exc: RequestValidationError):
        response = await validation_handler(request, exc)
        if request.url.path in INFERENCE_PATHS:
            state.metrics.requests.labels(UNKNOWN, str(response.status_code)).inc()
        return response

    app.add_exception_handler(RequestValidationError, counted_validation_error)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestGuardMiddleware, allowed_origins=settings.allowed_origins)
    if settings.allowed_origins:  # outermost: answers the preflights of the pages it allows
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.include_router(system_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(lorax_routes.router)
    app.include_router(usage_routes.router)
    # OTEL_* environment variables turn tracing on (docs/api.md, "Tracing").
    tracer_provider = tracing.setup(app, settings.version)
    return app
