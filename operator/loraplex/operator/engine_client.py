"""The operator's side of the engine's admin HTTP API (ARCHITECTURE.md, "Engine HTTP routes").

GET /info (boot_id), GET /v1/adapters?view=compact, POST /v1/adapters:batch, GET/PUT/DELETE
/v1/adapters/{name}, GET /metrics. Each call targets one pod (its IP and the container port the
operator rendered) and has its own short timeouts, so that a dead or slow pod never holds up the
others. Manifests go in batches: at 10,000 adapters a request each costs more in HTTP overhead
(on both sides) than the registrations themselves. An engine without the batch route (an older
image) gets one PUT per manifest instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger("loraplex.operator.engine")


class EngineError(Exception):
    """The engine answered with an error (4xx/5xx); `message` is the engine's own text."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message

    @property
    def transient(self) -> bool:
        # 503: not ready yet; 429: queue full; 5xx: the server's trouble; 401/403: the engine
        # refuses the operator's admin token - none of them is the adapter's fault.
        return self.status in (401, 403, 429) or (self.status >= 500 and self.status != 501)


class EngineUnreachable(Exception):
    """No HTTP answer at all: connection refused, timeout, reset."""


@dataclass(frozen=True)
class AdapterReport:
    state: str
    message: str
    raw: dict


@dataclass
class BatchResult:
    """One report or error per manifest pushed, and the HTTP calls it took."""

    reports: dict[str, AdapterReport | EngineError | EngineUnreachable]
    calls: int


def _error_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip()[:2000] or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        for key in ("message", "detail"):
            if data.get(key):
                return str(data[key])
    return resp.text.strip()[:2000]


def _report(data: Any) -> AdapterReport:
    if not isinstance(data, dict):
        raise EngineError(502, f"unexpected adapter payload: {data!r}"[:500])
    state = data.get("state")
    if state is None and isinstance(data.get("adapter"), dict):  # tolerate a wrapped payload
        data = data["adapter"]
        state = data.get("state")
    if not isinstance(state, str):
        raise EngineError(502, f"adapter payload without a state: {data!r}"[:500])
    return AdapterReport(state=state, message=str(data.get("message") or ""), raw=data)


class EngineClient:
    def __init__(self, *, timeout: float = 30.0, connect_timeout: float = 3.0,
                 transport: httpx.AsyncBaseTransport | None = None, max_connections: int = 64):
        # The pool is larger than the passes' own concurrency bounds, so that no request ever
        # waits for a pooled connection (a pool timeout would read as an unreachable engine).
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=None),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            headers={"User-Agent": "loraplex-operator"},
            trust_env=False,  # pod IPs never go through an HTTP proxy
        )
        self._no_batch: set[str] = set()  # engines (base URLs) that have no batch route

    async def aclose(self) -> None:
        await self._http.aclose()

    @staticmethod
    def base_url(ip: str, port: int) -> str:
        host = f"[{ip}]" if ":" in ip else ip
        return f"http://{host}:{port}"

    async def _call(self, method: str, url: str, *, json: Any = None, token: str | None = None,
                    ok404: bool = False) -> httpx.Response | None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            resp = await self._http.request(method, url, json=json, headers=headers)
        except (httpx.TransportError, OSError) as e:
            raise EngineUnreachable(f"{method} {url}: {type(e).__name__}: {e}".strip()) from e
        if resp.status_code == 404 and ok404:
            return None
        if resp.status_code >= 400:
            raise EngineError(resp.status_code, _error_message(resp))
        return resp

    async def info(self, ip: str, port: int, token: str | None = None) -> dict:
        resp = await self._call("GET", f"{self.base_url(ip, port)}/info", token=token)
        assert resp is not None
        data = resp.json()
        if not isinstance(data, dict):
            raise EngineError(502, "GET /info did not return an object")
        return data

    async def put_adapter(self, ip: str, port: int, manifest: dict, token: str | None = None) -> AdapterReport:
        resp = await self._call("PUT", f"{self.base_url(ip, port)}/v1/adapters/{manifest['name']}",
                                json=manifest, token=token)
        assert resp is not None
        return _report(resp.json())

    async def put_adapters(self, ip: str, port: int, manifests: list[dict], token: str | None = None) -> BatchResult:
        """Register many manifests in one POST /v1/adapters:batch. A manifest the engine refuses
        comes back as its EngineError; trouble with the whole request raises as for one PUT."""
        base = self.base_url(ip, port)
        if base not in self._no_batch:
            try:
                resp = await self._call("POST", f"{base}/v1/adapters:batch", json={"adapters": manifests},
                                        token=token)
            except EngineError as e:
                if e.status not in (404, 405):
                    raise
                self._no_batch.add(base)  # an engine older than the route
                log.info("engine %s has no batch route (HTTP %d): one PUT per adapter", base, e.status)
                fallback = await self._put_each(ip, port, manifests, token)
                fallback.calls += 1
                return fallback
            assert resp is not None
            data = resp.json()
            rows = data.get("data") if isinstance(data, dict) else None
            if not isinstance(rows, list) or len(rows) != len(manifests):
                raise EngineError(502, "POST /v1/adapters:batch did not answer one row per manifest")
            reports: dict = {}
            for m, row in zip(manifests, rows):
                if isinstance(row, dict) and isinstance(row.get("error"), dict):
                    reports[m["name"]] = EngineError(int(row.get("status") or 400), str(row["error"].get("message")))
                else:
                    try:
                        reports[m["name"]] = _report(row)
                    except EngineError as e:
                        reports[m["name"]] = e
            return BatchResult(reports, 1)
        return await self._put_each(ip, port, manifests, token)

    async def _put_each(self, ip: str, port: int, manifests: list[dict], token: str | None) -> BatchResult:
        reports: dict = {}
        for m in manifests:
            try:
                reports[m["name"]] = await self.put_adapter(ip, port, m, token)
            except (EngineError, EngineUnreachable) as e:
                reports[m["name"]] = e
        return BatchResult(reports, len(manifests))

    async def list_adapters(self, ip: str, port: int, token: str | None = None) -> list[dict]:
        """Every adapter the engine knows, each `{name, state, message, dynamic, manifest_digest}`
        (the compact view; an older engine answers its full rows, with `manifest` instead)."""
        resp = await self._call("GET", f"{self.base_url(ip, port)}/v1/adapters?view=compact", token=token)
        assert resp is not None
        data = resp.json()
        items = data.get("data") if isinstance(data, dict) else data
        if not isinstance(items, list) or not all(isinstance(a, dict) and "name" in a for a in items):
            raise EngineError(502, "GET /v1/adapters did not return a list of adapters")
        return items

    async def get_adapter(self, ip: str, port: int, name: str, token: str | None = None) -> AdapterReport | None:
        """The adapter's state on that engine, or None when the engine does not know it."""
        resp = await self._call("GET", f"{self.base_url(ip, port)}/v1/adapters/{name}", token=token, ok404=True)
        return None if resp is None else _report(resp.json())

    async def delete_adapter(self, ip: str, port: int, name: str, token: str | None = None) -> bool:
        """True when unloaded, False when the engine did not know it."""
        resp = await self._call("DELETE", f"{self.base_url(ip, port)}/v1/adapters/{name}", token=token,
                                ok404=True)
        return resp is not None

    async def metrics(self, ip: str, port: int, token: str | None = None) -> str:
        """The engine's /metrics; with its admin token, restricted adapters show under their names."""
        resp = await self._call("GET", f"{self.base_url(ip, port)}/metrics", token=token)
        assert resp is not None
        return resp.text


def boot_id_of(info: dict) -> str:
    boot = info.get("boot_id") or info.get("bootId")
    if not boot:
        raise EngineError(502, "GET /info has no boot_id")
    return str(boot)
