"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""
from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter, Request

from loraplex.engine.api import tools as tool_calls
from loraplex.engine.api.auth import Authenticator, Principal
from loraplex.engine.api.errors import APIError, finite
from loraplex.engine.api.lifecycle import InferenceCall, WireFormat
from loraplex.engine.api.protocol import ChatCompletionRequest, CompletionRequest, _OpenAISampling
from loraplex.engine.api.sse import sse
from loraplex.engine.api.state import ServerState, get_state
from loraplex.engine.api.structured import openai_spec
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.sequence import RequestResult, TokenLogprob

router = APIRouter()
DONE = "data: [DONE]\n\n"


# ---- models ---------------------------------------------------------------------------------

def model_cards(state: ServerState, principal: Principal) -> list[dict]:
    engine = state.require_engine()
    base = engine.served_model_name
    created = int(state.started)
    cards = [{"id": base, "object": "model", "created": created, "owned_by": "loraplex",
              "root": engine.model_id, "parent": None, "max_model_len": engine.max_model_len}]
    for d in engine.adapters.list():
        manifest = d["manifest"]
        if Authenticator.may_see(principal, manifest.get("tenants") or []):
            cards.append({"id": d["name"], "object": "model", "created": created, "owned_by": "loraplex",
                          "root": manifest.get("uri"), "parent": base, "max_model_len": engine.max_model_len,
                          "state": d["state"]})
    return cards


@router.get("/v1/models")
async def list_models(request: Request):
    state = get_state(request)
    principal = state.auth.inference(request)
    return {"object": "list", "data": model_cards(state, principal)}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    state = get_state(request)
    principal = state.auth.inference(request)
    for card in model_cards(state, principal):
        if card["id"] == model:
            return card
    raise APIError(404, f"the model {model!r} does not exist", code="model_not_found", param="model")


# ---- shared -----------------------------------------------------------------------------------

def logit_bias(body: _OpenAISampling) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} as ids (the engine checks them against the vocabulary)."""
    if not body.logit_bias:
        return None
    return {int(k): float(v) for k, v in body.logit_bias.items()}


def sampling_params(body: _OpenAISampling, max_tokens: int | None, logprobs: int | None, i: int,
                    bias: dict[int, float] | None = None, grammar=None, prompt_logprobs: bool = False) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=None if body.seed is None else body.seed + i,  # n choices differ, yet reproducible
        stop=body.stop_list,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias,
        min_tokens=body.min_tokens,
        grammar=grammar.matcher() if grammar is not None else None,
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length", "tool_calls") else "stop"


class _OpenAIWire(WireFormat):
    """What completions and chat share: the model field, n, sampling, usage and the chunk envelope."""

    object_name = ""
    chunk_object = ""

    def __init__(self, body: _OpenAISampling):
        self.body = body
        self.stream = body.stream
        self.n = body.n
        self.bias: dict[int, float] | None = None

    async def model_name(self, call: InferenceCall) -> str | None:
        return self.body.model

    def session(self, call: InferenceCall) -> str | None:
        return self.body.user

    def prepare(self, call: InferenceCall):
        self.bias = logit_bias(self.body)
        return openai_spec(self.body)

    def answer(self, call: InferenceCall, results: list[RequestResult]) -> dict:
        return {"id": call.request_id, "object": self.object_name, "created": call.created, "model": call.model.name,
                "choices": [self.choice(call, i, r) for i, r in enumerate(results)],
                "usage": usage(call.timer.prompt_tokens, sum(r.completion_tokens for r in results))}

    def choice(self, call: InferenceCall, index: int, r: RequestResult) -> dict:
        raise NotImplementedError

    def chunk_choice(self, call: InferenceCall, index: int, out, first: bool) -> dict | None:
        raise NotImplementedError

    def chunk(self, call: InferenceCall, choices: list[dict]) -> dict:
        return {"id": call.request_id, "object": self.chunk_object, "created": call.created,
                "model": call.model.name, "choices": choices}

    def events(self, call: InferenceCall, index: int, out, first: bool) -> Iterable[str]:
        choice = self.chunk_choice(call, index, out, first)
        return () if choice is None else (sse(self.chunk(call, [choice])),)

    def closing(self, call: InferenceCall) -> Iterable[str]:
        if self.body.include_usage:
            chunk = self.chunk(call, [])
            chunk["usage"] = usage(call.timer.prompt_tokens, sum(r.completion_tokens for r in call.results))
            yield sse(chunk)
        yield DONE

    def failure(self, call: InferenceCall, err: APIError) -> Iterable[str]:
        return sse(err.body()), DONE


# ---- completions ------------------------------------------------------------------------------

class CompletionWire(_OpenAIWire):
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"
    body: CompletionRequest

    def __init__(self, body: CompletionRequest):
        super().__init__(body)
        self.offsets: dict[int, int] = {}
        self.prompt_list: list[str | list[int]] = []

    def prompts(self, call: InferenceCall):
        try:
            self.prompt_list = self.body.prompts()
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        return self.prompt_list

    @property
    def echo_logprobs(self) -> bool:
        return self.body.echo and self.body.logprobs is not None

    def sampling(self, call: InferenceCall, i: int) -> SamplingParams:
        return sampling_params(self.body, self.body.max_tokens, self.body.logprobs, i, self.bias, call.grammar,
                               prompt_logprobs=self.echo_logprobs)

    def prompt_text(self, call: InferenceCall, index: int) -> str:
        """echo: the prompt as the client sent it (token ids decoded)."""
        prompt = self.prompt_list[index // self.n]
        return prompt if isinstance(prompt, str) else call.engine.tokenizer.decode(prompt, skip_special_tokens=False)

    def logprobs(self, call: InferenceCall, index: int, lps: list[TokenLogprob],
                 prompt_lps: list[float | None] | None = None) -> dict | None:
        if self.body.logprobs is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        offset = self.offsets.get(index, 0)
        if prompt_lps is not None:  # echo: the prompt's tokens first (the first has no logprob)
            for token_id, value in zip(call.seqs[index].prompt_ids, prompt_lps):
                text = call.token_text(token_id)
                tokens.append(text)
                values.append(None if value is None else finite(value))
                tops.append(None if value is None else {text: finite(value)})
                offsets.append(offset)
                offset += len(text)
        for lp in lps:
            text = call.token_text(lp.token_id)
            top = {call.token_text(t): finite(v) for t, v in lp.top}
            top.setdefault(text, finite(lp.logprob))
            tokens.append(text)
            values.append(finite(lp.logprob))
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        self.offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def choice(self, call: InferenceCall, index: int, r: RequestResult) -> dict:
        text = self.prompt_text(call, index) + r.text if self.body.echo else r.text
        prompt_lps = r.prompt_logprobs if self.echo_logprobs else None
        return {"index": index, "text": text, "logprobs": self.logprobs(call, index, r.logprobs, prompt_lps),
                "finish_reason": finish_reason(r.finish_reason), "stop_reason": r.stop_reason}

    def chunk_choice(self, call: InferenceCall, index: int, out, first: bool) -> dict | None:
        text = out.new_text
        if first and self.body.echo:
            text = self.prompt_text(call, index) + text
        prompt_lps = out.prompt_logprobs if self.echo_logprobs else None
        if not text and not out.finished and not (self.body.logprobs is not None and (out.logprobs or prompt_lps)):
            return None
        return {"index": index, "text": text, "logprobs": self.logprobs(call, index, out.logprobs, prompt_lps),
                "finish_reason": finish_reason(out.finish_reason) if out.finished else None,
                "stop_reason": out.stop_reason if out.finished else None}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await InferenceCall(get_state(request), request, CompletionWire(body)).respond()


# ---- chat ---------------------------------------------------------------------------------------

def render_chat(tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The prompt token ids from the tokenizer's chat template (add_generation_prompt), with the
    request's tools, assistant tool calls and tool results rendered by the template itself."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    messages = tool_calls.template_messages(body.messages)
    kwargs = dict(body.chat_template_kwargs or {})
    if body.tools:
        kwargs["tools"] = tool_calls.template_tools(body.tools)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt,
                                             **kwargs)
    except Exception as exc:  # jinja2 errors, raise_exception() in templates, bad kwargs
        raise APIError(400, f"the chat template could not render these messages: {exc}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


class ChatWire(_OpenAIWire):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    body: ChatCompletionRequest

    def __init__(self, body: ChatCompletionRequest):
        super().__init__(body)
        self.tool_choice: str | None = None  # none | auto | required | named | None (no tools)
        self.parser = None  # the family's tool call parser when tool_choice is auto
        self.streams: dict[int, tool_calls.StreamingToolParser] = {}
        self.buffered: dict[int, str] = {}  # constrained tool calls: the output until it ends
        self.calls_sent: dict[int, int] = {}  # streamed tool calls per choice (their delta index)

    def prepare(self, call: InferenceCall):
        self.bias = logit_bias(self.body)
        self.tool_choice = tool_calls.tool_choice_of(self.body)
        spec = openai_spec(self.body)
        constrained = tool_calls.constrained_spec(self.body, self.tool_choice)
        if spec is not None and constrained is not None:
            raise APIError(400, f"tool_choice {self.tool_choice!r} cannot be combined with {spec.param}",
                           param="tool_choice")
        return spec or constrained

    @property
    def constrained(self) -> bool:
        return self.tool_choice in ("required", "named")

    def prompts(self, call: InferenceCall):
        tokenizer = call.engine.tokenizer
        if self.tool_choice == "auto":
            self.parser = tool_calls.parser_for(call.state.settings.tool_call_parser, tokenizer.chat_template)
        return [render_chat(tokenizer, self.body)]

    def sampling(self, call: InferenceCall, i: int) -> SamplingParams:
        k = None
        if self.body.logprobs:
            k = self.body.top_logprobs or 0
        return sampling_params(self.body, self.body.max_new_tokens, k, i, self.bias, call.grammar)

    def logprobs(self, call: InferenceCall, lps: list[TokenLogprob]) -> dict | None:
        if not self.body.logprobs:
            return None

        def entry(token_id: int, value: float) -> dict:
            text = call.token_text(token_id)
            return {"token": text, "logprob": finite(value), "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    def calls_in(self, text: str, reason: str | None) -> tuple[str | None, list[tool_calls.ParsedCall]]:
        """(content, tool calls) of a finished output."""
        if self.constrained:
            calls = tool_calls.constrained_calls(self.body, self.tool_choice, text) if reason == "stop" else []
            return (None, calls) if calls else (text, [])
        if self.parser is not None:
            return self.parser.parse(text)
        return text, []

    @staticmethod
    def _finish(reason: str | None, calls) -> str | None:
        return "tool_calls" if calls and reason == "stop" else finish_reason(reason)

    def choice(self, call: InferenceCall, index: int, r: RequestResult) -> dict:
        content, calls = self.calls_in(r.text, r.finish_reason)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.openai() for c in calls]
        return {"index": index, "message": message, "logprobs": self.logprobs(call, r.logprobs),
                "finish_reason": self._finish(r.finish_reason, calls), "stop_reason": r.stop_reason}

    def stream_text(self, index: int, out) -> tuple[str, list[tool_calls.ParsedCall]]:
        """(content to send, calls completed) for this output of a streamed choice."""
        if self.constrained:
            self.buffered[index] = self.buffered.get(index, "") + out.new_text
            if not out.finished:
                return "", []
            content, calls = self.calls_in(self.buffered.pop(index), out.finish_reason)
            return content or "", calls
        if self.parser is None:
            return out.new_text, []
        stream = self.streams.setdefault(index, tool_calls.StreamingToolParser(self.parser))
        return stream.feed(out.new_text, out.finished)

    def chunk_choice(self, call: InferenceCall, index: int, out, first: bool) -> dict | None:
        text, calls = self.stream_text(index, out)
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text or first:
            delta["content"] = text
        if calls:
            sent = self.calls_sent.get(index, 0)
            delta["tool_calls"] = [c.openai(sent + k) for k, c in enumerate(calls)]
            self.calls_sent[index] = sent + len(calls)
        has_lp = bool(self.body.logprobs and out.logprobs)
        if not delta and not out.finished and not has_lp:
            return None
        reason = None
        if out.finished:
            reason = self._finish(out.finish_reason, self.calls_sent.get(index, 0))
        return {"index": index, "delta": delta, "logprobs": self.logprobs(call, out.logprobs) if has_lp else None,
                "finish_reason": reason}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await InferenceCall(get_state(request), request, ChatWire(body)).respond()
