"""The operator's adapter catalog as the home of every name nobody registered here.

An operator-managed engine gets `--adapter-catalog-url http://<operator>:9091/catalog/v1/<ns>/<base>`.
A request for an adapter this pod was not given (placement keeps it warm elsewhere) is looked up
there: `GET <url>/adapters/<name>` with the engine's admin token answers the adapter's manifest,
the same one the operator pushes to its placed pods (its own source, sha256 and tenant key
hashes). The manager registers it as a dynamic entry and the usual just-in-time load runs, so
the adapter's tenant rules and digest apply on every pod, placed or not.

`locate(name)` is blocking (one HTTP call): the NameResolver runs it on its own small pool, with
its in-flight sharing, concurrency cap and negative cache. What the catalog answers becomes:
- 200: the manifest (must carry the asked name);
- 404: UnknownAdapterError (404, negative-cached): the name is no LoraAdapter of this base;
- 409: CatalogRefusedError (424, negative-cached): it exists but cannot be served (Failed, deleting);
- anything else (unreachable, timeout, 5xx, 401/403 for a token the operator does not know):
  CatalogUnavailableError (503 with Retry-After), never cached: the next request asks again.

`placement(pod, limit, timeout)` asks `GET <url>/placement/<pod>` for the manifests placed on
this pod, hottest first: what a warm start loads before the pod reports Ready (warm_start.py).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from loraplex.engine.core.errors import AdapterUnavailableError, RequestError, UnknownAdapterError
from loraplex.manifest import DNS1123_LABEL, AdapterManifest

log = logging.getLogger("loraplex.adapters.catalog")

RETRY_AFTER_SECONDS = 2


class CatalogUnavailableError(RequestError):
    """The catalog could not answer: the request may succeed if retried shortly."""

    status = 503
    code = "adapter_catalog_unavailable"
    retry_after = RETRY_AFTER_SECONDS


class CatalogRefusedError(AdapterUnavailableError):
    """The catalog knows the adapter but will not have it served now (Failed, being deleted)."""

    negative_cache = True


class PlacementRefusedError(ValueError):
    """The catalog will not answer a placement (400, 404: an operator without the route): asking
    again will not help."""


class CatalogSource:
    def __init__(self, url: str, token_file: str | None, timeout: float = 5.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--adapter-catalog-url must be an http(s) URL, not {url!r}")
        self.url = url.rstrip("/")
        self.token_file = Path(token_file) if token_file else None
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)),
                                   limits=httpx.Limits(max_connections=8, max_keepalive_connections=4))
        # Catalog answers by result (ok, not_found, refused, unavailable), for
        # loraplex_adapter_catalog_requests_total: a catalog outage shows as `unavailable`.
        self.results: dict[str, int] = {}
        self._lock = threading.Lock()  # locate() runs on the resolver's pool threads

    def _token(self) -> str | None:
        """The admin token, read at each call (rare: one per unknown name per negative-cache TTL),
        so that a rotated Secret is picked up without a restart."""
        if self.token_file is None:
            return None
        try:
            lines = self.token_file.read_text().strip().splitlines()
        except OSError as exc:
            raise CatalogUnavailableError(f"the adapter catalog token cannot be read: {exc}", param="model") from None
        return lines[0].strip() if lines else None

    def locate(self, name: str) -> AdapterManifest:
        result = "unavailable"
        try:
            manifest = self._locate(name)
            result = "ok"
            return manifest
        except UnknownAdapterError:
            result = "not_found"
            raise
        except CatalogRefusedError:
            result = "refused"
            raise
        finally:
            with self._lock:
                self.results[result] = self.results.get(result, 0) + 1

    def counts(self) -> dict[str, int]:
        """Lookups so far by result (a copy)."""
        with self._lock:
            return dict(self.results)

    def _locate(self, name: str) -> AdapterManifest:
        # A LoraAdapter's name is a DNS-1123 label: anything else is no adapter of the catalog,
        # and is not worth a call.
        if len(name) > 63 or not DNS1123_LABEL.match(name):
            raise UnknownAdapterError(f"the model {name[:80]!r} does not exist", param="model")
        token = self._token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            r = self.client.get(f"{self.url}/adapters/{quote(name, safe='')}", headers=headers)
        except httpx.HTTPError as exc:
            log.warning("adapter catalog %s unreachable: %s", self.url, exc)
            raise CatalogUnavailableError(f"the adapter catalog is unreachable ({type(exc).__name__}); "
                                          "retry shortly", param="model") from None
        message = _message(r)
        if r.status_code == 404:
            raise UnknownAdapterError(f"the model {name!r} does not exist: {message}", param="model")
        if r.status_code == 409:
            raise CatalogRefusedError(f"the adapter {name!r} cannot be served now: {message}", param="model")
        if r.status_code != 200:
            if r.status_code in (401, 403):
                log.error("adapter catalog %s refused this engine's admin token (%d): %s",
                          self.url, r.status_code, message)
            raise CatalogUnavailableError(f"the adapter catalog answered {r.status_code}: {message}", param="model")
        try:
            manifest = AdapterManifest.model_validate(r.json())
        except (ValueError, ValidationError) as exc:
            raise CatalogUnavailableError(f"the adapter catalog answered a bad manifest for {name!r}: {exc}",
                                          param="model") from None
        if manifest.name != name:
            raise CatalogUnavailableError(f"the adapter catalog answered the manifest of {manifest.name!r} "
                                          f"for {name!r}", param="model")
        # preload is the placed pods' business: a just-in-time copy is evictable like any other.
        return manifest.model_copy(update={"preload": False})

    def placement(self, pod: str, limit: int, timeout: float) -> list[AdapterManifest]:
        """The manifests placed on `pod`, hottest first, at most `limit`. One call of at most
        `timeout` s, on a connection closed afterwards (a retry may then reach another operator
        replica: a standby answers 503). Raises CatalogUnavailableError (ask again after its
        `retry_after`) or PlacementRefusedError."""
        token = self._token()
        headers = {"Connection": "close", **({"Authorization": f"Bearer {token}"} if token else {})}
        try:
            r = self.client.get(f"{self.url}/placement/{quote(pod, safe='')}", params={"limit": str(limit)},
                                headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)))
        except httpx.HTTPError as exc:
            raise CatalogUnavailableError(f"the adapter catalog is unreachable ({type(exc).__name__})") from None
        if r.status_code in (400, 404):
            raise PlacementRefusedError(f"the adapter catalog answered {r.status_code}: {_message(r)}")
        if r.status_code != 200:
            error = CatalogUnavailableError(f"the adapter catalog answered {r.status_code}: {_message(r)}")
            try:
                error.retry_after = max(0.1, min(float(r.headers.get("Retry-After", RETRY_AFTER_SECONDS)), 30.0))
            except ValueError:
                pass
            raise error
        try:
            items = r.json().get("adapters")
        except (ValueError, AttributeError):
            items = None
        if not isinstance(items, list):
            raise PlacementRefusedError("the adapter catalog's placement answer holds no adapter list")
        out: dict[str, AdapterManifest] = {}
        for item in items[:limit]:
            try:
                manifest = AdapterManifest.model_validate(item)
            except (ValueError, ValidationError) as exc:
                log.warning("adapter catalog placement: a manifest was left out: %s", exc)
                continue
            # A warm start registers, never preloads: the ConfigMap carries the preload adapters.
            out.setdefault(manifest.name, manifest.model_copy(update={"preload": False}))
        return list(out.values())

    def close(self) -> None:
        self.client.close()


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
        return str(body.get("error", {}).get("message") or body)[:300]
    except ValueError:
        return r.text[:300] or r.reason_phrase
