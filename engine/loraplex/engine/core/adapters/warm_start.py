"""The warm start: before a new pod reports Ready, it loads the adapters the operator placed on it,
hottest first, within a time budget (docs/engine.md "Warm start").

On an operator-managed engine (--adapter-catalog-url, the admin token, POD_NAME from the downward
API) with --warm-start-budget-seconds > 0, once the model is up:

1. ask the catalog which adapters are placed on this pod (catalog_source.CatalogSource.placement:
   hottest first, at most what the tiers can hold), again and again while it cannot answer
   (unreachable, a standby's 503), each try bounded by what is left of the budget;
2. register them as the operator's pushes do (an adapter this pod already has registered, from
   its ConfigMap or a push, is kept as it is);
3. load them in list order (warming.py): into the host tier, and into the device slots that are
   free, never evicting anything (preload adapters keep their slots);
4. end when every listed adapter is resident (host tier or a device slot), failed, or cannot fit,
   or when the budget is spent. Until then `holds_ready()` is true and /ready answers 503; after
   it, the adapters not loaded load just in time, as on any pod.

Warm means *resident*: in a device slot, or in host RAM, from where the first request's copy
into a free slot happens inside the scheduler's step (no load from disk or the network, no
`adapter_load` phase in its trace).

Everything runs on a thread of its own: the fetch blocks on HTTP and the loads run on the
manager's pool; the event loop only reads `holds_ready()` and `view()`. A catalog that never
answers costs the budget and nothing more.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from loraplex.engine.core.adapters.catalog_source import CatalogUnavailableError, PlacementRefusedError
from loraplex.engine.core.errors import RequestError

log = logging.getLogger("loraplex.adapters.warm_start")

MAX_LISTED = 256  # manifests asked for at most (the catalog's own cap, PLACEMENT_MAX)
FETCH_TIMEOUT_SECONDS = 5.0  # one placement call at most (less when less of the budget is left)
POLL_SECONDS = 0.05  # how often the loads' progress is read


class WarmStart:
    """One pod's warm start. `start()` once, after the model is up; then `holds_ready()`, `view()`."""

    def __init__(self, adapters, pod: str | None, budget_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.mgr = adapters  # AdapterManager
        self.pod = pod
        self.budget_seconds = float(budget_seconds)
        self.clock = clock
        self.state = "off"  # off | fetching | loading | done
        self.reason: str | None = None  # why it is off, or what the catalog last said
        self.listed = 0
        self.resident = 0
        self.timed_out = False
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        if self.budget_seconds <= 0:
            self.reason = "--warm-start-budget-seconds is 0"
            return
        missing = [what for what, ok in (("POD_NAME", self.pod), ("--adapter-catalog-url", self.mgr.catalog))
                   if not ok]
        if missing:
            self.reason = f"no {' and no '.join(missing)}: nothing says which adapters are placed on this pod"
            log.warning("warm start off: %s", self.reason)
            return
        self.started_at, self.state = self.clock(), "fetching"
        threading.Thread(target=self._run, name="warm-start", daemon=True).start()

    @property
    def deadline(self) -> float:
        return (self.started_at or 0.0) + self.budget_seconds

    def holds_ready(self) -> bool:
        """True while the pod must not report Ready: the warm start runs and its budget is not spent."""
        with self._lock:
            return self.state in ("fetching", "loading") and self.clock() < self.deadline

    def view(self) -> dict:
        """What /info shows (`warm_start`) and the metrics read."""
        with self._lock:
            now = self.clock()
            running = self.state in ("fetching", "loading")
            timed_out = self.timed_out or (running and now >= self.deadline)
            if self.started_at is None:
                seconds = None
            elif self.ended_at is not None:
                seconds = min(self.ended_at, self.deadline) - self.started_at
            else:
                seconds = min(now, self.deadline) - self.started_at
            return {"state": "done" if running and timed_out else self.state, "pod": self.pod,
                    "budget_seconds": self.budget_seconds, "listed": self.listed, "resident": self.resident,
                    "seconds": None if seconds is None else round(seconds, 3), "timed_out": timed_out,
                    "message": self.reason}

    def cancel(self) -> None:
        self._stop.set()

    # ---- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        warmed = False
        try:
            manifests = self._fetch()
            if manifests and self.clock() < self.deadline and not self._stop.is_set():
                names = self._register(manifests)
                self.mgr.warm(names)
                warmed = True
                with self._lock:
                    self.state, self.listed = "loading", len(names)
                self._wait_for_loads()
        except Exception:  # the pod must become Ready whatever happens here
            log.exception("warm start failed")
            self.reason = "the warm start failed; see the log"
        finally:
            if warmed:
                self.mgr.end_warm()
            with self._lock:
                self.ended_at = self.clock()
                self.timed_out = self.timed_out or self.ended_at >= self.deadline
                self.state = "done"
            log.info("warm start: %d of %d placed adapters resident in %.1f s%s", self.resident, self.listed,
                     min(self.ended_at, self.deadline) - self.started_at,
                     " (budget spent: the rest load just in time)" if self.timed_out else "")

    def _fetch(self) -> list:
        limit = max(1, min(MAX_LISTED, self.mgr.num_slots + self.mgr.config.max_cpu_adapters))
        while not self._stop.is_set():
            left = self.deadline - self.clock()
            if left <= 0:
                return []
            try:
                return self.mgr.catalog.placement(self.pod, limit, min(FETCH_TIMEOUT_SECONDS, left))
            except CatalogUnavailableError as exc:
                self.reason = str(exc)
                log.info("warm start: %s; asking again", exc)
                self._stop.wait(min(float(exc.retry_after), max(0.0, self.deadline - self.clock())))
            except PlacementRefusedError as exc:
                self.reason = str(exc)
                log.warning("warm start: %s; nothing to warm", exc)
                return []
        return []

    def _register(self, manifests: list) -> list[str]:
        """Register what this pod does not have registered yet; the names to warm, in order."""
        names = []
        for manifest in manifests:
            known = self.mgr.get(manifest.name)
            try:
                if known is None or known["dynamic"]:
                    self.mgr.register(manifest)
            except RequestError as exc:
                log.warning("warm start: adapter %s not registered: %s", manifest.name, exc)
                continue
            names.append(manifest.name)
        return names

    def _wait_for_loads(self) -> None:
        while True:
            progress = self.mgr.warm_progress()
            with self._lock:
                self.resident = progress.resident
            if progress.done:
                return
            if self.clock() >= self.deadline:
                self.timed_out = True
                return
            if self._stop.wait(POLL_SECONDS):
                return
