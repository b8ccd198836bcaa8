"""The OpenAI Responses API, stateless: POST /v1/responses.

A request is translated into a chat completion (input items -> messages, `instructions` -> a
leading system message, `text.format` -> response_format, function tools -> tools) and run by
the chat wire format (openai_routes.ChatWire: template, grammar, tool parsing); only the answer's
shape differs. Nothing is stored: `previous_response_id` is a 400 and GET /v1/responses/{id}
a 404, both saying so.

Streams follow the documented event order: response.created, response.in_progress, then per
output item output_item.added, (content_part.added, output_text.delta..., output_text.done,
content_part.done | function_call_arguments.delta, function_call_arguments.done),
output_item.done, and finally response.completed (or response.incomplete when
max_output_tokens cut it). Every event carries `type` and `sequence_number`.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, ValidationError

from loraplex.engine.api.errors import APIError
from loraplex.engine.api.lifecycle import InferenceCall, WireFormat
from loraplex.engine.api.openai_routes import ChatWire
from loraplex.engine.api.protocol import ChatCompletionRequest, _Body
from loraplex.engine.api.sse import sse_event
from loraplex.engine.api.state import get_state
from loraplex.engine.core.sequence import RequestResult

router = APIRouter()


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextOptions(_Body):
    format: TextFormat | None = None


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    stream: bool = False
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content or []:
        if part.get("type") not in ("input_text", "output_text", "text"):
            raise APIError(400, f"input content type {part.get('type')!r} is not supported (text only)", param="input")
        parts.append(part.get("text") or "")
    return "".join(parts)


def chat_messages(body: ResponsesRequest) -> list[dict]:
    """Responses input items as chat messages. Consecutive function_call items become one
    assistant message with tool_calls; function_call_output items become tool messages."""
    messages: list[dict] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return messages + [{"role": "user", "content": body.input}]
    for item in body.input:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": _text_of(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise APIError(400, f"input item type {kind!r} is not supported", param="input")
    return messages


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    tools = None
    if body.tools:
        tools = []
        for t in body.tools:
            if t.get("type") != "function":
                raise APIError(400, f"tool type {t.get('type')!r} is not supported (function tools only)", param="tools")
            tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                           if k in t}})
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    fields: dict[str, Any] = {
        "model": body.model, "messages": chat_messages(body), "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "tools": tools, "tool_choice": choice,
        "parallel_tool_calls": body.parallel_tool_calls, "stream": body.stream,
    }
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type != "text":
        fields["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}}
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()))
        raise APIError(400, f"{param}: {first.get('msg')}", param=param or None) from None


class ResponsesWire(WireFormat):
    """The Responses API's shapes over the chat wire format (template, grammar, tool parsing)."""

    id_prefix = "resp"

    def __init__(self, body: ResponsesRequest):
        self.body = body
        self.stream = body.stream
        self.chat: ChatWire | None = None
        self.seq_no = 0
        self.items: list[dict | None] = []  # the output items streamed so far
        self.message: dict | None = None  # the open message item: {"id", "index", "text"}

    # ---- the request: the chat's -----------------------------------------------------------

    async def model_name(self, call: InferenceCall) -> str | None:
        if self.body.previous_response_id is not None:
            raise APIError(400, "previous_response_id is not supported: this server does not store responses; "
                           "send the whole conversation in `input`", param="previous_response_id")
        self.chat = ChatWire(chat_request(self.body))
        return self.body.model

    def session(self, call: InferenceCall) -> str | None:
        return self.body.user

    def prepare(self, call: InferenceCall):
        return self.chat.prepare(call)

    def prompts(self, call: InferenceCall):
        return self.chat.prompts(call)

    def sampling(self, call: InferenceCall, i: int):
        return self.chat.sampling(call, i)

    # ---- shapes ----------------------------------------------------------------------------

    def response(self, call: InferenceCall, status: str, output: list, usage: dict | None = None) -> dict:
        body = self.body
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else {"type": "text"}
        return {
            "id": call.request_id, "object": "response", "created_at": call.created, "status": status,
            "model": call.model.name, "output": output, "usage": usage, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "tools": body.tools or [],
            "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls,
            "text": {"format": fmt}, "previous_response_id": None, "store": False, "truncation": "disabled",
            "metadata": body.metadata or {}, "user": body.user,
        }

    @staticmethod
    def usage(call: InferenceCall) -> dict:
        prompt, completion = call.timer.prompt_tokens, sum(r.completion_tokens for r in call.results)
        return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
                "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}

    @staticmethod
    def message_item(item_id: str, text: str, status: str = "completed") -> dict:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def call_item(call, status: str = "completed") -> dict:
        return {"type": "function_call", "id": f"fc_{call.id[len('call_'):]}", "call_id": call.id, "name": call.name,
                "arguments": call.arguments if status == "completed" else "", "status": status}

    @staticmethod
    def status_of(reason: str | None) -> str:
        return "incomplete" if reason == "length" else "completed"

    # ---- answers ---------------------------------------------------------------------------

    def answer(self, call: InferenceCall, results: list[RequestResult]) -> dict:
        r = results[0]
        content, calls = self.chat.calls_in(r.text, r.finish_reason)
        output = []
        if content:
            output.append(self.message_item(f"msg_{uuid.uuid4().hex}", content))
        output += [self.call_item(c) for c in calls]
        return self.response(call, self.status_of(r.finish_reason), output, self.usage(call))

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.seq_no, **fields}
        self.seq_no += 1
        return sse_event(kind, data)

    def opening(self, call: InferenceCall) -> Iterable[str]:
        yield self.event("response.created", response=self.response(call, "in_progress", []))
        yield self.event("response.in_progress", response=self.response(call, "in_progress", []))

    def events(self, call: InferenceCall, index: int, out, first: bool) -> Iterable[str]:
        text, calls = self.chat.stream_text(0, out)
        output = self.items
        if text:
            if self.message is None:
                self.message = {"id": f"msg_{uuid.uuid4().hex}", "index": len(output), "text": ""}
                output.append(None)  # its place; filled when done
                yield self.event("response.output_item.added", output_index=self.message["index"],
                                 item=self.message_item(self.message["id"], "", "in_progress"))
                yield self.event("response.content_part.added", item_id=self.message["id"],
                                 output_index=self.message["index"], content_index=0,
                                 part={"type": "output_text", "text": "", "annotations": []})
            self.message["text"] += text
            yield self.event("response.output_text.delta", item_id=self.message["id"],
                             output_index=self.message["index"], content_index=0, delta=text, logprobs=[])
        if calls or out.finished:
            yield from self._close_message()
        for c in calls:
            i = len(output)
            item = self.call_item(c)
            output.append(item)
            yield self.event("response.output_item.added", output_index=i, item=self.call_item(c, "in_progress"))
            yield self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                             delta=c.arguments)
            yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                             name=c.name, arguments=c.arguments)
            yield self.event("response.output_item.done", output_index=i, item=item)
        if out.finished:
            final = self.status_of(out.finish_reason)
            yield self.event(f"response.{final}", response=self.response(call, final, output, self.usage(call)))

    def _close_message(self) -> Iterable[str]:
        message, self.message = self.message, None
        if message is None:
            return
        item = self.message_item(message["id"], message["text"])
        self.items[message["index"]] = item
        where = dict(item_id=message["id"], output_index=message["index"], content_index=0)
        yield self.event("response.output_text.done", **where, text=message["text"], logprobs=[])
        yield self.event("response.content_part.done", **where, part=item["content"][0])
        yield self.event("response.output_item.done", output_index=message["index"], item=item)

    def failure(self, call: InferenceCall, err: APIError) -> Iterable[str]:
        return (self.event("error", code=err.code, message=err.message, param=err.param),)


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    return await InferenceCall(get_state(request), request, ResponsesWire(body)).respond()


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    get_state(request).auth.inference(request)
    raise APIError(404, f"response {response_id!r} not found: this server does not store responses",
                   code="not_found", param="response_id")
