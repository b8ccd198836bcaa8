"""The server's state, one per app (`app.state.server`): settings, auth, metrics, the engine
once it is up, and the pool that prepares requests off the event loop."""
from __future__ import annotations

import asyncio
import concurrent.futures
import time

from fastapi import Request

from loraplex.engine.api.auth import Authenticator
from loraplex.engine.api.errors import APIError
from loraplex.engine.api.metrics import Metrics
from loraplex.engine.api.quotas import QuotaLimiter
from loraplex.engine.api.settings import ServerSettings
from loraplex.engine.api.usage import UsageMeter
from loraplex.engine.core.adapters.warm_start import WarmStart
from loraplex.engine.core.async_engine import AsyncEngine


class ServerState:
    def __init__(self, settings: ServerSettings, auth: Authenticator):
        self.settings = settings
        self.auth = auth
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.started = time.time()
        self.metrics = Metrics(lambda: self.engine, settings.max_adapter_metric_labels,
                               settings.max_residency_metric_adapters, lambda: self.warm_start)
        self.quotas: QuotaLimiter | None = None  # set by create_app
        self.usage: UsageMeter | None = None  # set by create_app
        self.watcher = None  # ManifestWatcher, when --adapter-manifest-file is set
        self.warm_start: WarmStart | None = None  # set at bring-up; /ready waits for it (app.py)
        # Request preparation (chat templates, tokenization, validation) runs here, not on the
        # event loop: a 100k-character prompt takes ~100 ms to tokenize, and every stream waits.
        self.prepare_pool = concurrent.futures.ThreadPoolExecutor(
            settings.prepare_workers, thread_name_prefix="loraplex-prepare") if settings.prepare_workers else None

    def require_engine(self) -> AsyncEngine:
        if self.engine is None:
            if self.load_error:
                raise APIError(503, f"the engine failed to start: {self.load_error}", code="engine_failed")
            raise APIError(503, "the model is still loading; retry shortly", code="not_ready")
        if not self.engine.is_alive:
            raise APIError(503, "the engine's step loop has stopped", code="engine_dead")
        return self.engine

    async def off_loop(self, fn, *args):
        """Run blocking request preparation on the prepare pool (or inline with --prepare-workers 0,
        the baseline bench/http_prep.py compares against); exceptions come back as raised."""
        if self.prepare_pool is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.prepare_pool, fn, *args)


def get_state(request: Request) -> ServerState:
    return request.app.state.server
