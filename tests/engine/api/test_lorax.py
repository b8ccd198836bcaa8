"""lorax-client (unchanged) against the server, plus the raw LoRAX routes."""
from __future__ import annotations

import json

import httpx
import pytest
from lorax import Client
from lorax.errors import NotFoundError, ShardNotReadyError

from tests.engine.api.conftest import ADMIN, ADMIN_TOKEN, KEY_A, assert_error

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def lorax(server):
    return Client(server.url, headers=KEY_A, timeout=60)


def test_generate_with_details(lorax, tokenizer):
    resp = lorax.generate(PROMPT, adapter_id="a2", max_new_tokens=5, ignore_eos_token=True, decoder_input_details=True)
    d = resp.details
    assert d.finish_reason.value == "length"
    assert d.generated_tokens == 5 and len(d.tokens) == 5
    prompt_ids = tokenizer.encode(PROMPT)
    assert d.prompt_tokens == len(prompt_ids)
    assert [t.id for t in d.prefill] == prompt_ids
    assert d.prefill[0].logprob is None and all(t.logprob <= 0 for t in d.prefill[1:])
    assert all(t.logprob <= 0 for t in d.tokens)
    assert d.seed is None  # greedy
    assert tokenizer.decode([t.id for t in d.tokens], skip_special_tokens=True).startswith(resp.generated_text)


def test_generate_stream_matches_generate(lorax):
    full = lorax.generate(PROMPT, adapter_id="a3", max_new_tokens=6, ignore_eos_token=True)
    events = list(lorax.generate_stream(PROMPT, adapter_id="a3", max_new_tokens=6, ignore_eos_token=True))
    assert len(events) == 6
    assert [e.token.id for e in events] == [t.id for t in full.details.tokens]
    assert "".join(e.token.text for e in events) == full.generated_text
    assert events[-1].generated_text == full.generated_text
    assert events[-1].details.finish_reason.value == "length" and events[-1].details.generated_tokens == 6
    assert all(e.generated_text is None for e in events[:-1])


def test_sampling_reports_a_seed_that_reproduces(lorax):
    first = lorax.generate(PROMPT, adapter_id="a1", do_sample=True, max_new_tokens=6, ignore_eos_token=True)
    assert first.details.seed is not None
    again = lorax.generate(PROMPT, adapter_id="a1", do_sample=True, seed=first.details.seed, max_new_tokens=6,
                           ignore_eos_token=True)
    assert again.generated_text == first.generated_text


def test_base_model_without_adapter_and_return_full_text(lorax):
    resp = lorax.generate(PROMPT, max_new_tokens=3, return_full_text=True, return_k_alternatives=2)
    assert resp.generated_text.startswith(PROMPT)
    assert all(len(t.alternative_tokens) == 2 for t in resp.details.tokens)


def test_raw_routes(server, lorax):
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "a2", "max_new_tokens": 4, "details": True,
                                             "ignore_eos_token": True}}
    gen = httpx.post(server.url + "/generate", json=body, headers=KEY_A, timeout=60)
    assert gen.status_code == 200, gen.text
    out = gen.json()
    assert set(out) == {"generated_text", "details"}
    compat = httpx.post(server.url + "/", json=body, headers=KEY_A, timeout=60).json()
    assert isinstance(compat, list) and len(compat) == 1 and compat[0]["generated_text"] == out["generated_text"]
    no_details = httpx.post(server.url + "/generate", headers=KEY_A, timeout=60,
                            json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}).json()
    assert set(no_details) == {"generated_text"}
    # POST / with stream: SSE, no [DONE] (lorax-client would choke on it)
    with httpx.stream("POST", server.url + "/", json={**body, "stream": True}, headers=KEY_A, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    events = [json.loads(ln[len("data:"):]) for ln in lines]
    assert all(ln.startswith("data:") for ln in lines) and len(events) == 4
    assert events[-1]["generated_text"] == out["generated_text"]


def test_unknown_adapter_is_404(lorax, server):
    with pytest.raises(NotFoundError):
        lorax.generate(PROMPT, adapter_id="does-not-exist", max_new_tokens=2)
    r = httpx.post(server.url + "/generate", headers=KEY_A, timeout=30,
                   json={"inputs": PROMPT, "parameters": {"adapter_id": "does-not-exist"}})
    assert_error(r, 404, "model_not_found")
    bad = httpx.post(server.url + "/generate", headers=KEY_A, timeout=30,
                     json={"inputs": PROMPT, "parameters": {"temperature": -1}})
    assert_error(bad, 400)
    assert bad.json()["error_type"] == "validation"


def test_adapter_source_registration_needs_admin(server, assets):
    params = {"inputs": PROMPT, "parameters": {"adapter_id": str(assets.adapter_dir / "a2"), "adapter_source": "local",
                                               "max_new_tokens": 3}}
    r = httpx.post(server.url + "/generate", json=params, headers=KEY_A, timeout=30)
    assert_error(r, 403, "forbidden")
    r = httpx.post(server.url + "/generate", json=params, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    # registered under a derived name, and reused on the next call
    lorax = Client(server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    again = lorax.generate(PROMPT, adapter_id=str(assets.adapter_dir / "a2"), max_new_tokens=3)
    assert again.generated_text == r.json()["generated_text"]
    listed = httpx.get(server.url + "/v1/adapters", headers=ADMIN).json()["data"]
    derived = [a for a in listed if a["manifest"]["uri"] == str(assets.adapter_dir / "a2")]
    assert len(derived) == 1
    assert httpx.delete(server.url + f"/v1/adapters/{derived[0]['name']}", headers=ADMIN).status_code == 200


def test_adapter_source_on_the_fly_without_admin_token(open_server, assets):
    """No admin token configured: any caller may name an adapter by source, as with LoRAX."""
    lorax = Client(open_server.url, timeout=60)
    resp = lorax.generate(PROMPT, adapter_id="a1", adapter_source="local", max_new_tokens=4, ignore_eos_token=True)
    assert resp.details.generated_tokens == 4
    listed = {m["id"] for m in httpx.get(open_server.url + "/v1/models").json()["data"]}
    assert "a1" in listed
    # a source that cannot deliver: the adapter fails to load, the request gets the reason
    with pytest.raises(ShardNotReadyError):  # lorax-client's class for 424
        lorax.generate(PROMPT, adapter_id="missing-dir", adapter_source="local", max_new_tokens=2)
    r = httpx.post(open_server.url + "/generate", timeout=30,
                   json={"inputs": PROMPT, "parameters": {"adapter_id": "missing-dir", "max_new_tokens": 2}})
    assert_error(r, 424, "adapter_failed")
