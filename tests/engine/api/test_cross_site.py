"""Requests a browser sends for a page of another site (CSRF), through the real server: every
POST/PUT/DELETE with a foreign Origin, or marked `Sec-Fetch-Site: cross-site`, gets 403 before
it reaches a route (admin and inference alike); the same request from the server's own origin,
or with no Origin (every non-browser client), is served. --allowed-origins (the open server
allows ALLOWED_ORIGIN) lets an origin through and answers its CORS preflight."""
from __future__ import annotations

import httpx
import pytest

from tests.engine.api.conftest import ADMIN, ALLOWED_ORIGIN, KEY_A, assert_error

EVIL = "https://evil.example"
BODY = {"model": "a1", "prompt": "hello", "max_tokens": 2, "temperature": 0}
# (method, path, credentials, JSON body or None): admin routes, inference routes, a body-less one
UNSAFE = [("POST", "/v1/completions", KEY_A, BODY),
          ("POST", "/generate", KEY_A, {"inputs": "hello", "parameters": {"max_new_tokens": 2}}),
          ("POST", "/v1/load_lora_adapter", ADMIN, {"lora_name": "csrf", "lora_path": "a2"}),
          ("PUT", "/v1/adapters/csrf", ADMIN, {"name": "csrf", "source": "local", "uri": "a2"}),
          ("DELETE", "/v1/adapters/a2", ADMIN, None)]


def adapters(server) -> set[str]:
    return {d["name"] for d in httpx.get(server.url + "/v1/adapters", headers=ADMIN).json()["data"]}


@pytest.mark.parametrize("method,path,creds,body", UNSAFE)
@pytest.mark.parametrize("browser", [{"Origin": EVIL}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": EVIL, "Content-Type": "text/plain"},
                                     {"Origin": "http://127.0.0.1.evil.example"}])
def test_cross_site_unsafe_requests_are_403(server, method, path, creds, body, browser):
    before = adapters(server)
    kw = {"json": body} if body is not None and "Content-Type" not in browser else {}
    if "Content-Type" in browser:
        kw = {"content": httpx.Request("POST", "http://x", json=body).content}
    r = httpx.request(method, server.url + path, headers={**creds, **browser}, timeout=60, **kw)
    err = assert_error(r, 403, "cross_origin_forbidden")
    assert err["type"] == "permission_error"
    assert adapters(server) == before  # nothing was registered or removed


def test_same_origin_and_non_browser_requests_are_served(server):
    for extra in ({}, {"Origin": server.url}, {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}):
        r = httpx.post(server.url + "/v1/completions", json=BODY, headers={**KEY_A, **extra}, timeout=60)
        assert r.status_code == 200, (extra, r.text)
    # reads are not refused: a page cannot read the answer without CORS anyway
    assert httpx.get(server.url + "/v1/models", headers={**KEY_A, "Origin": EVIL}).status_code == 200


def test_allowed_origins_pass_and_get_cors_answers(open_server):
    r = httpx.post(open_server.url + "/v1/completions", json=BODY, timeout=60,
                   headers={"Origin": ALLOWED_ORIGIN, "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    pre = httpx.options(open_server.url + "/v1/completions", headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert_error(httpx.post(open_server.url + "/v1/completions", json=BODY, headers={"Origin": EVIL}), 403,
                 "cross_origin_forbidden")
    pre = httpx.options(open_server.url + "/v1/completions", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
