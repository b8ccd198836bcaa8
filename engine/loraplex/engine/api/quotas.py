"""Per-tenant quotas: requests per minute, tokens per minute, concurrent requests.

The request lifecycle calls, per request:

    admission = limiter.admit(principal.tenant, principal.settings, prompt_tokens + max_output_tokens)
    ...                             # raises RateLimited (an APIError 429) when over a limit
    admission.settle(actual_tokens) # once usage is known (prompt + completion); may be called again
    admission.release()             # in a `finally`: success, error, disconnect (idempotent)

and adds `admission.headers` (or `limiter.headers(tenant, settings)`) to its response.

Requests and tokens per minute are token buckets that refill continuously: a bucket holds at
most the per-minute limit and refills at limit/60 per second, so a tenant may burst up to a
minute's worth and then runs at its rate (no cliff at a window boundary, unlike fixed windows;
a sliding log would cost memory per request). A request needs one request-token, and as many
tokens as it reserves, capped at the bucket's size: a request larger than a minute's tokens is
admitted when the bucket is full and leaves it in debt (below zero), which later requests wait
out. `max_concurrent` counts admitted requests not yet released.

429s carry `Retry-After` (whole seconds), `retry-after-ms` (what the openai SDK reads first) and
OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers: only those of limits
that are set (a tenant without limits gets none). `reset` is the time until the bucket is full
again, in OpenAI's format (`20ms`, `1s`, `6m0s`).

State: one entry per tenant that has limits (none for tenants without), at most `max_tenants`.
Past the cap the least recently used entry at rest (no request in flight, buckets full: the same
as a fresh one) goes first; failing that, the least recently used idle entry (its tenant's
buckets restart full). Entries with requests in flight are kept, so the map can only exceed the
cap by the number of tenants with requests in flight. All methods are thread-safe (one lock,
O(1) work under it except the eviction scan).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from loraplex.engine.api.errors import APIError
from loraplex.engine.api.tenants import TenantLimits, TenantSettings

log = logging.getLogger("loraplex.engine.api.quotas")

CONCURRENT_RETRY_SECONDS = 1.0  # when a slot frees is unknown; the SDK's backoff takes over after this
LIMIT_NAMES = ("requests", "tokens", "concurrent")  # RateLimited.limit, the rate_limited metric's label


def _ceil(x: float) -> int:
    """Round up, ignoring float noise (60 * 101 / 6000 is 1.0100000000000002, not 1.01)."""
    return math.ceil(x - 1e-6)


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes its reset headers (Go's time.Duration format, to the
    millisecond, rounded up): 0s, 20ms, 1s, 1.5s, 6m0s, 1h0m0s."""
    ms = _ceil(max(0.0, seconds) * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    text = f"{secs}" + (f".{frac:03d}".rstrip("0") if frac else "") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text


class _Bucket:
    """A token bucket of `size` that refills at size/60 per second."""

    __slots__ = ("size", "level", "stamp")

    def __init__(self, size: int, now: float):
        self.size, self.level, self.stamp = size, float(size), now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(float(self.size), self.level + (now - self.stamp) * self.size / 60.0)
        self.stamp = max(self.stamp, now)

    def wait(self, need: float) -> float:
        """Seconds until the level reaches `need` (0 if it has)."""
        return max(0.0, (need - self.level) * 60.0 / self.size)

    def reset(self) -> float:
        return self.wait(self.size)

    def resize(self, size: int) -> None:
        self.size, self.level = size, min(self.level, float(size))


class _TenantState:
    __slots__ = ("requests", "tokens", "in_flight")

    def __init__(self):
        self.requests: _Bucket | None = None
        self.tokens: _Bucket | None = None
        self.in_flight = 0

    def sync(self, limits: TenantLimits, now: float) -> None:
        """Follow the tenant's current limits (the keys file may have been reloaded): a new limit
        starts full, a changed one keeps its level (capped), a removed one goes."""
        for name, size in (("requests", limits.requests_per_minute), ("tokens", limits.tokens_per_minute)):
            bucket = getattr(self, name)
            if size is None:
                setattr(self, name, None)
            elif bucket is None:
                setattr(self, name, _Bucket(size, now))
            else:
                bucket.refill(now)
                if bucket.size != size:
                    bucket.resize(size)

    def at_rest(self, now: float) -> bool:
        """Indistinguishable from a fresh entry: nothing in flight, every bucket full."""
        if self.in_flight:
            return False
        for b in (self.requests, self.tokens):
            if b is not None:
                b.refill(now)
                if b.level < b.size:
                    return False
        return True


def _headers(state: _TenantState | None, limits: TenantLimits) -> dict[str, str]:
    """OpenAI's rate-limit headers for the limits that are set; call with buckets refilled."""
    out: dict[str, str] = {}
    for name, size in (("requests", limits.requests_per_minute), ("tokens", limits.tokens_per_minute)):
        if size is None:
            continue
        bucket = getattr(state, name) if state is not None else None
        remaining = size if bucket is None else max(0, math.floor(bucket.level))
        out[f"x-ratelimit-limit-{name}"] = str(size)
        out[f"x-ratelimit-remaining-{name}"] = str(remaining)
        out[f"x-ratelimit-reset-{name}"] = format_reset(0.0 if bucket is None else bucket.reset())
    return out


class RateLimited(APIError):
    """429 `rate_limit_exceeded` for a tenant over a quota; `limit` is the first limit hit
    (requests, tokens or concurrent), for the metrics."""

    def __init__(self, tenant: str, limit: str, message: str, retry_after: float, headers: dict[str, str]):
        headers = {**headers, "Retry-After": str(max(1, _ceil(retry_after))),
                   "retry-after-ms": str(max(1, _ceil(retry_after * 1000)))}
        super().__init__(429, message, code="rate_limit_exceeded", headers=headers)
        self.tenant = tenant
        self.limit = limit
        self.retry_after = retry_after


class Admission:
    """A request let in: settle its tokens, release its concurrency slot (always)."""

    def __init__(self, limiter: "QuotaLimiter | None", tenant: str, state: _TenantState | None, reserved: int,
                 headers: dict[str, str]):
        self._limiter = limiter
        self.tenant = tenant
        self._state = state
        self.charged = reserved  # tokens taken from the tenant's bucket for this request
        self.headers = headers  # the x-ratelimit-* headers as of admission, for the response
        self.released = state is None

    def settle(self, actual_tokens: int) -> None:
        """Charge `actual_tokens` (prompt + completion as served) instead of what was charged so
        far: the difference is refunded to, or taken from, the tenant's token bucket."""
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, got {actual_tokens}")
        if self._state is None:
            self.charged = actual_tokens
            return
        with self._limiter._lock:
            bucket = self._state.tokens
            if bucket is not None:
                bucket.refill(self._limiter._clock())
                bucket.level = min(float(bucket.size), bucket.level - (actual_tokens - self.charged))
            self.charged = actual_tokens

    def release(self) -> None:
        """Free the request's concurrency slot. Idempotent: call it on every path."""
        if self.released:
            return
        with self._limiter._lock:
            if self.released:
                return
            self.released = True
            self._limiter._release(self.tenant, self._state)

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class QuotaLimiter:
    """Every tenant's quota state (one per app); see the module's docstring."""

    def __init__(self, max_tenants: int = 1000, clock: Callable[[], float] = time.monotonic):
        if max_tenants < 1:
            raise ValueError(f"max_tenants must be >= 1, got {max_tenants}")
        self.max_tenants = max_tenants
        self._clock = clock
        self._lock = threading.Lock()
        self._states: OrderedDict[str, _TenantState] = OrderedDict()  # least recently used first
        self.lossy_evictions = 0  # entries dropped while not at rest (their tenants' buckets restarted full)

    def __len__(self) -> int:
        return len(self._states)

    def admit(self, tenant: str, settings: TenantSettings, reserve_tokens: int) -> Admission:
        """Let a request in, taking one request and `reserve_tokens` tokens (prompt + max output)
        from the tenant's buckets and a concurrency slot; RateLimited (429) when over a limit."""
        if isinstance(reserve_tokens, bool) or not isinstance(reserve_tokens, int) or reserve_tokens < 0:
            raise ValueError(f"reserve_tokens must be an int >= 0, got {reserve_tokens!r}")
        limits = settings.limits
        with self._lock:
            state = self._states.get(tenant)
            if state is None and not limits.any():
                return Admission(None, tenant, None, reserve_tokens, {})
            now = self._clock()
            if state is None:
                state = self._insert(tenant, now)
            else:
                self._states.move_to_end(tenant)
            state.sync(limits, now)
            over = self._over(tenant, state, limits, reserve_tokens)
            if over is not None:
                limit, message, wait = over
                raise RateLimited(tenant, limit, message, wait, _headers(state, limits))
            if state.requests is not None:
                state.requests.level -= 1
            if state.tokens is not None:
                state.tokens.level -= reserve_tokens
            state.in_flight += 1
            return Admission(self, tenant, state, reserve_tokens, _headers(state, limits))

    def headers(self, tenant: str, settings: TenantSettings) -> dict[str, str]:
        """The x-ratelimit-* headers of a tenant now (for responses), without making state."""
        with self._lock:
            state = self._states.get(tenant)
            if state is not None:
                state.sync(settings.limits, self._clock())
            return _headers(state, settings.limits)

    @staticmethod
    def _over(tenant: str, state: _TenantState, limits: TenantLimits,
              reserve: int) -> tuple[str, str, float] | None:
        """(limit, message, seconds to wait) of the limits this request is over, or None."""
        hits: list[tuple[str, str, float]] = []
        if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
            hits.append(("concurrent", f"concurrent requests: Limit {limits.max_concurrent}, In flight "
                                       f"{state.in_flight}", CONCURRENT_RETRY_SECONDS))
        if state.requests is not None and state.requests.level < 1:
            wait = state.requests.wait(1)
            hits.append(("requests", f"requests per min (RPM): Limit {state.requests.size}, Remaining 0, "
                                     f"Requested 1", wait))
        if state.tokens is not None:
            need = min(reserve, state.tokens.size)
            if state.tokens.level < need:
                wait = state.tokens.wait(need)
                hits.append(("tokens", f"tokens per min (TPM): Limit {state.tokens.size}, Remaining "
                                       f"{max(0, math.floor(state.tokens.level))}, Requested {reserve}", wait))
        if not hits:
            return None
        wait = max(h[2] for h in hits)  # a retry before every limit has room would fail again
        message = (f"Rate limit reached for tenant {tenant!r} on " + "; on ".join(h[1] for h in hits)
                   + f". Please try again in {format_reset(wait)}.")
        return hits[0][0], message, wait

    def _release(self, tenant: str, state: _TenantState) -> None:
        """Under the lock. An entry left with no bucket and nothing in flight (a tenant with only
        max_concurrent, or whose limits were removed) is the same as none: drop it."""
        state.in_flight -= 1
        if (state.in_flight == 0 and state.requests is None and state.tokens is None
                and self._states.get(tenant) is state):
            del self._states[tenant]

    def _insert(self, tenant: str, now: float) -> _TenantState:
        if len(self._states) >= self.max_tenants:
            self._evict(now)
        state = self._states[tenant] = _TenantState()
        return state

    def _evict(self, now: float) -> None:
        idle = None
        for name, state in self._states.items():  # least recently used first
            if state.at_rest(now):
                del self._states[name]
                return
            if idle is None and state.in_flight == 0:
                idle = name
        if idle is not None:
            del self._states[idle]
            self.lossy_evictions += 1
            if self.lossy_evictions == 1 or self.lossy_evictions % 1000 == 0:
                log.warning("quota state of more than --max-tenants=%d tenants: evicted a tenant's buckets "
                            "before they refilled (%d times so far); raise --max-tenants", self.max_tenants,
                            self.lossy_evictions)
        # else: every entry has requests in flight; the map grows by one (bounded by requests in flight)
