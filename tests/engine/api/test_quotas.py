"""Per-tenant quotas (quotas.py): bucket arithmetic on an injected clock, the 429's body and
headers through the app's exception handler, settle, release, bounded state, threads, and the
openai SDK's own retry honouring the answer."""
from __future__ import annotations

import threading
import types

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from loraplex.engine.api.errors import install_error_handlers
from loraplex.engine.api.quotas import QuotaLimiter, RateLimited, format_reset
from loraplex.engine.api.tenants import UNLIMITED, TenantLimits, TenantSettings


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def limits(rpm=None, tpm=None, conc=None) -> TenantSettings:
    return TenantSettings(limits=TenantLimits(rpm, tpm, conc))


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (-3, "0s"), (0.0001, "1ms"), (0.02, "20ms"), (0.999, "999ms"), (0.9999, "1s"), (1, "1s"),
    (1.5, "1.5s"), (1.25, "1.25s"), (59.9, "59.9s"), (60, "1m0s"), (90.5, "1m30.5s"), (360, "6m0s"),
    (3600, "1h0m0s"), (3725.004, "1h2m5.004s"),
])
def test_reset_format_is_openais(seconds, text):
    assert format_reset(seconds) == text


def test_requests_bucket_refills_continuously():
    clock = Clock()
    q = QuotaLimiter(clock=clock)
    s = limits(rpm=60)  # 1 a second, up to 60 at once
    for _ in range(60):
        q.admit("t", s, 0).release()
    with pytest.raises(RateLimited) as exc:
        q.admit("t", s, 0)
    err = exc.value
    assert (err.status, err.code, err.limit, err.tenant) == (429, "rate_limit_exceeded", "requests", "t")
    assert "requests per min (RPM): Limit 60" in err.message and "try again in 1s" in err.message
    assert err.headers["Retry-After"] == "1" and err.headers["retry-after-ms"] == "1000"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-reset-requests"] == "1m0s"  # empty: a full minute to be full again
    clock.t += 0.5
    with pytest.raises(RateLimited) as exc:  # half a request back: not yet
        q.admit("t", s, 0)
    assert exc.value.headers["retry-after-ms"] == "500" and exc.value.headers["Retry-After"] == "1"
    clock.t += 0.5
    adm = q.admit("t", s, 0)
    assert adm.headers["x-ratelimit-remaining-requests"] == "0"
    clock.t += 30
    assert q.headers("t", s) == {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "30",
                                 "x-ratelimit-reset-requests": "30s"}
    clock.t += 1000  # never above the limit
    assert q.headers("t", s)["x-ratelimit-remaining-requests"] == "60"


def test_tokens_reserve_settle_and_debt():
    clock = Clock()
    q = QuotaLimiter(clock=clock)
    s = limits(tpm=6000)  # 100 tokens a second
    a = q.admit("t", s, 5000)
    assert a.headers == {"x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "1000",
                         "x-ratelimit-reset-tokens": "50s"}
    with pytest.raises(RateLimited) as exc:
        q.admit("t", s, 1500)
    assert exc.value.limit == "tokens" and exc.value.headers["retry-after-ms"] == "5000"
    assert "Limit 6000, Remaining 1000, Requested 1500" in exc.value.message
    a.settle(1200)  # used 1200 of the 5000 reserved: 3800 back
    assert q.headers("t", s)["x-ratelimit-remaining-tokens"] == "4800"
    a.settle(1300)  # settled again with a later count: only the difference
    assert q.headers("t", s)["x-ratelimit-remaining-tokens"] == "4700"
    a.release()
    b = q.admit("t", s, 100)
    b.settle(4800)  # used more than reserved: charged, down into debt
    assert q.headers("t", s)["x-ratelimit-remaining-tokens"] == "0"
    with pytest.raises(RateLimited) as exc:  # level -100: 100 to repay, then 1 to spend
        q.admit("t", s, 1)
    assert exc.value.headers["retry-after-ms"] == "1010"
    clock.t += 120
    c = q.admit("t", s, 99999)  # larger than a minute's tokens: let in once the bucket is full...
    with pytest.raises(RateLimited) as exc:
        q.admit("t", s, 0)  # ...and the debt is waited out
    assert exc.value.headers["x-ratelimit-remaining-tokens"] == "0"
    c.settle(0)  # nothing generated after all: refunded up to the bucket's size, no more
    assert q.headers("t", s)["x-ratelimit-remaining-tokens"] == "6000"
    with pytest.raises(ValueError):
        c.settle(-1)
    with pytest.raises(ValueError):
        q.admit("t", s, -1)


def test_concurrency_release_is_idempotent():
    clock = Clock()
    q = QuotaLimiter(clock=clock)
    s = limits(conc=2)
    a, b = q.admit("t", s, 10), q.admit("t", s, 10)
    with pytest.raises(RateLimited) as exc:
        q.admit("t", s, 10)
    err = exc.value
    assert err.limit == "concurrent" and "concurrent requests: Limit 2, In flight 2" in err.message
    assert err.headers == {"Retry-After": "1", "retry-after-ms": "1000"}  # no bucket limits: no x-ratelimit-*
    a.release()
    a.release()  # twice: still one slot back, not two
    c = q.admit("t", s, 10)
    with pytest.raises(RateLimited):
        q.admit("t", s, 10)
    with b:  # a context manager releases on the way out
        pass
    with c:
        pass
    assert len(q) == 0  # nothing in flight, no buckets: the entry went
    q.admit("other", s, 0)  # another tenant's slots are its own


def test_every_limit_over_is_named_and_retry_waits_for_all():
    clock = Clock()
    q = QuotaLimiter(clock=clock)
    s = limits(rpm=60, tpm=60, conc=1)
    q.admit("t", s, 60)
    with pytest.raises(RateLimited) as exc:
        q.admit("t", s, 30)
    err = exc.value
    assert err.limit == "concurrent"  # the first hit names the metric's label
    assert "concurrent requests" in err.message and "tokens per min (TPM)" in err.message
    assert err.headers["retry-after-ms"] == "30000" and err.headers["Retry-After"] == "30"  # the longest wait
    assert set(err.headers) == {"Retry-After", "retry-after-ms", *(f"x-ratelimit-{k}-{n}" for k in (
        "limit", "remaining", "reset") for n in ("requests", "tokens"))}


def test_tenants_without_limits_keep_no_state():
    q = QuotaLimiter(clock=Clock())
    for i in range(100):
        a = q.admit(f"t{i}", UNLIMITED, 10**9)
        assert a.headers == {} and q.headers(f"t{i}", UNLIMITED) == {}
        a.settle(5)
        a.release()
    assert len(q) == 0


def test_limits_follow_settings_changes():
    clock = Clock()
    q = QuotaLimiter(clock=clock)
    q.admit("t", limits(rpm=10), 0).release()
    assert q.headers("t", limits(rpm=10))["x-ratelimit-remaining-requests"] == "9"
    assert q.headers("t", limits(rpm=5))["x-ratelimit-remaining-requests"] == "5"  # capped at the new size
    assert q.headers("t", limits(rpm=5, tpm=100))["x-ratelimit-remaining-tokens"] == "100"  # a new limit starts full
    q.admit("t", UNLIMITED, 0).release()  # limits removed: the entry goes once idle
    assert len(q) == 0


def test_state_is_bounded():
    clock = Clock()
    q = QuotaLimiter(max_tenants=3, clock=clock)
    s = limits(rpm=60)
    one = limits(rpm=60, conc=1)
    busy = q.admit("busy", one, 0)  # in flight: never evicted
    q.admit("a", s, 0).release()
    q.admit("b", s, 0).release()
    clock.t += 1  # a's and b's buckets are full again: at rest, evicted for free
    q.admit("c", s, 0).release()  # a goes
    q.admit("d", s, 0).release()  # b goes
    assert len(q) == 3 and q.lossy_evictions == 0
    q.admit("e", s, 0).release()  # nobody at rest: the least recently used idle entry (c) goes
    assert len(q) == 3 and q.lossy_evictions == 1
    assert q.headers("d", s)["x-ratelimit-remaining-requests"] == "59"  # d kept its state
    for i in range(50):  # many more tenants: still 3 entries
        q.admit(f"x{i}", s, 0).release()
    assert len(q) == 3
    for i in range(3):  # every entry in flight: the map grows only by what is in flight
        q.admit(f"y{i}", s, 0)
    assert len(q) == 4
    with pytest.raises(RateLimited):  # busy's entry was kept all along: its one slot is still taken
        q.admit("busy", one, 0)
    busy.release()
    q.admit("busy", one, 0)


def test_threads_never_exceed_max_concurrent():
    q = QuotaLimiter()
    s = limits(conc=3, rpm=10**6)
    held, peak, refused = [0], [0], [0]
    lock = threading.Lock()

    def worker():
        for _ in range(300):
            try:
                adm = q.admit("t", s, 1)
            except RateLimited:
                with lock:
                    refused[0] += 1
                continue
            with lock:
                held[0] += 1
                peak[0] = max(peak[0], held[0])
            with lock:
                held[0] -= 1
            adm.release()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 3 and held[0] == 0
    assert q.admit("t", s, 1) and q.admit("t", s, 1) and q.admit("t", s, 1)  # every slot came back
    with pytest.raises(RateLimited):
        q.admit("t", s, 1)


def quota_app(limiter: QuotaLimiter, settings: TenantSettings) -> FastAPI:
    """The app's exception handlers and a route shaped like the lifecycle's use of the limiter."""
    app = FastAPI()
    install_error_handlers(app)
    app.state.attempts = 0

    @app.post("/v1/chat/completions")
    @app.post("/generate")
    async def route(request: Request):
        app.state.attempts += 1
        body = await request.json()
        with limiter.admit("t", settings, body.get("max_tokens", 16)) as adm:
            adm.settle(3)
            from fastapi.responses import JSONResponse

            return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "hi"}}]},
                                headers=limiter.headers("t", settings))

    return app


def test_429_through_the_exception_handler():
    clock = Clock()
    limiter = QuotaLimiter(clock=clock)
    settings = limits(rpm=2, tpm=100)
    with TestClient(quota_app(limiter, settings)) as client:
        ok = client.post("/v1/chat/completions", json={"max_tokens": 40})
        assert ok.status_code == 200
        assert ok.headers["x-ratelimit-remaining-requests"] == "1" and ok.headers["x-ratelimit-remaining-tokens"] == "97"
        assert ok.headers["x-ratelimit-reset-tokens"] == "1.8s"
        over = client.post("/v1/chat/completions", json={"max_tokens": 98})
        assert over.status_code == 429
        assert over.json() == {"error": {"message": over.json()["error"]["message"], "type": "rate_limit_error",
                                         "param": None, "code": "rate_limit_exceeded"}}
        assert "tokens per min (TPM): Limit 100, Remaining 97, Requested 98" in over.json()["error"]["message"]
        assert over.headers["retry-after"] == "1" and over.headers["retry-after-ms"] == "600"
        assert over.headers["x-ratelimit-limit-tokens"] == "100" and over.headers["x-ratelimit-limit-requests"] == "2"
        lorax = client.post("/generate", json={"max_tokens": 98})  # LoRAX clients read error_type
        assert lorax.status_code == 429 and lorax.json()["error_type"] == "overloaded"


def test_the_openai_sdk_retries_after_what_the_429_says(monkeypatch):
    """The SDK's own retry: it waits what retry-after-ms says (its sleep is recorded, and moves
    the limiter's clock), then succeeds; the x-ratelimit-* headers reach the caller."""
    import openai
    import openai._base_client as base_client
    import uvicorn

    from tests.engine.api.conftest import free_port, wait_until

    clock = Clock()
    limiter = QuotaLimiter(clock=clock)
    settings = limits(tpm=60)  # 1 token a second
    app = quota_app(limiter, settings)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.t += seconds

    monkeypatch.setattr(base_client, "time", types.SimpleNamespace(sleep=sleep, time=__import__("time").time))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "uvicorn")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=2)
        limiter.admit("t", settings, 57).release()  # 3 tokens left
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert raw.parse().choices[0].message.content == "hi"
        assert app.state.attempts == 2 and slept == [2.0]  # 2 tokens short at 1 a second
        assert raw.headers["x-ratelimit-limit-tokens"] == "60"
        assert raw.headers["x-ratelimit-remaining-tokens"] == "2"  # 5 taken, 3 used: 2 back
    finally:
        server.should_exit = True
        thread.join(30)
