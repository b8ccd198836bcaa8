"""A streamed answer whose outputs were already delivered when the first of them is answered
(the client or the event loop fell behind the steps, or the n choices of one step) goes out in
fewer writes, and carries exactly the bytes it carried one write per output: the same events in
the same order, the failure after what came before it, the closing events last.

The lifecycle runs here with the real completions wire format over fake output streams; the
real server's streams are covered by test_streaming.py, test_openai.py and test_lorax.py."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from loraplex.engine.api.auth import Authenticator
from loraplex.engine.api.errors import APIError
from loraplex.engine.api.lifecycle import InferenceCall
from loraplex.engine.api.model_resolution import ServedModel
from loraplex.engine.api.openai_routes import CompletionWire
from loraplex.engine.api.protocol import CompletionRequest
from loraplex.engine.api.settings import ServerSettings
from loraplex.engine.api.state import ServerState
from loraplex.engine.core.sequence import RequestOutput, RequestResult, TokenLogprob


class FakeStream:
    """An engine OutputStream whose outputs (or error) all arrived already: `ready()` is how many
    are left. Every take yields to the event loop once, as a real queue hop can."""

    def __init__(self, items: list):
        self.items = list(items)
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def ready(self) -> int:
        return len(self.items)

    async def aclose(self):
        self.closed = True


def outputs(choice: int, tokens: int, fail: bool = False) -> list:
    """A choice's outputs, one token each: ids 10 + k, text "t<k> ", logprob -0.5 k; the last
    finishes (or an error comes instead)."""
    items = [RequestOutput(request_id=f"r-{choice}", new_token_ids=[10 + k], new_text=f"c{choice}t{k} ",
                           finished=k == tokens - 1 and not fail, finish_reason="length" if k == tokens - 1 else None,
                           prompt_tokens=3, completion_tokens=k + 1,
                           logprobs=[TokenLogprob(10 + k, -0.5 * k, [])]) for k in range(tokens)]
    if fail:
        items.append(APIError(500, "the engine failed this request", code="engine_error"))
    return items


def make_call(n: int, streams: list[FakeStream]) -> InferenceCall:
    state = ServerState(ServerSettings(prepare_workers=0), Authenticator())
    body = CompletionRequest(model="m", prompt="hello", stream=True, logprobs=0, n=n,
                             stream_options={"include_usage": True})
    call = InferenceCall(state, None, CompletionWire(body))
    call.request_id, call.created = "cmpl-test", 1700000000  # two calls compare byte for byte
    call.engine = SimpleNamespace(tokenizer=SimpleNamespace(decode=lambda ids, skip_special_tokens: f"<{ids[0]}>"))
    call.model = ServedModel(adapter=None, name="m")
    call.seqs = [SimpleNamespace(num_prompt_tokens=3) for _ in streams]
    call.results = [RequestResult() for _ in streams]
    call._streams = list(streams)
    return call


def writes(n: int, make_streams, coalesce: bool, monkeypatch) -> list[str]:
    """The body writes of one streamed answer (with coalescing, or one write per output as before)."""
    with monkeypatch.context() as m:
        if not coalesce:
            m.setattr(InferenceCall, "_ready", lambda self: False)

        async def run() -> list[str]:
            return [w async for w in make_call(n, make_streams())._stream()]

        return asyncio.run(run())


def events(body: str) -> list[str]:
    assert body.endswith("\n\n")
    return body.split("\n\n")[:-1]


@pytest.mark.parametrize("n", [1, 3])
def test_coalesced_writes_carry_the_same_events(n, monkeypatch):
    make = lambda: [FakeStream(outputs(c, 5)) for c in range(n)]  # noqa: E731
    one_each = writes(n, make, False, monkeypatch)
    coalesced = writes(n, make, True, monkeypatch)
    assert "".join(coalesced) == "".join(one_each)
    assert len(coalesced) < len(one_each)
    assert all(len(events(w)) == 1 for w in one_each[:-1])  # a write per output (then usage + [DONE])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events("".join(coalesced))[:-1]]
    assert events("".join(coalesced))[-1] == "data: [DONE]"
    assert chunks[-1]["usage"]["completion_tokens"] == 5 * n
    for c in range(n):  # every token of every choice, in order, with its logprob entry
        mine = [ch["choices"][0] for ch in chunks[:-1] if ch["choices"][0]["index"] == c]
        assert "".join(x["text"] for x in mine) == "".join(f"c{c}t{k} " for k in range(5))
        assert [x["logprobs"]["tokens"] for x in mine] == [[f"<{10 + k}>"] for k in range(5)]
        assert [x["finish_reason"] for x in mine] == [None] * 4 + ["length"]


def test_a_failure_follows_the_events_before_it(monkeypatch):
    make = lambda: [FakeStream(outputs(0, 3, fail=True))]  # noqa: E731
    one_each = writes(1, make, False, monkeypatch)
    coalesced = writes(1, make, True, monkeypatch)
    assert "".join(coalesced) == "".join(one_each)
    body = events("".join(coalesced))
    assert [json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in body[:3]] == ["c0t0 ", "c0t1 ", "c0t2 "]
    assert json.loads(body[3].removeprefix("data: "))["error"]["code"] == "engine_error"
    assert body[4] == "data: [DONE]"


def test_outputs_that_arrive_one_at_a_time_are_written_one_at_a_time(monkeypatch):
    """Nothing waits to be coalesced: with no output already delivered, each is written at once."""

    class OneAtATime(FakeStream):
        def ready(self) -> int:
            return 0

    got = writes(1, lambda: [OneAtATime(outputs(0, 4))], True, monkeypatch)
    assert [len(events(w)) for w in got] == [1, 1, 1, 1, 2]  # the last token, then usage + [DONE] together
