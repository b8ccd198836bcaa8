"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from loraplex.engine.api.auth import Principal
from loraplex.engine.api.errors import APIError, ClientGone, as_api_error, finite
from loraplex.engine.api.metrics import UNKNOWN, RequestTimer
from loraplex.engine.api.protocol import ChatCompletionRequest, CompletionRequest, _OpenAISampling
from loraplex.engine.api.serving import (ServerState, Target, collect, count_prompt_tokens, get_state, make_sequences,
                                  merge_streams, off_loop, output_error, resolve_model, seed_for, sse, sse_response,
                                  token_text, until_disconnect)
from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.sequence import TokenLogprob

router = APIRouter()
DONE = "data: [DONE]\n\n"


# ---- models ---------------------------------------------------------------------------------

def _may_list(principal: Principal, tenants: list[str]) -> bool:
    return not tenants or principal.is_admin or principal.key_hash in tenants


def model_cards(state: ServerState, principal: Principal) -> list[dict]:
    engine = state.require_engine().engine
    base = engine.served_model_name
    created = int(state.started)
    cards = [{"id": base, "object": "model", "created": created, "owned_by": "loraplex",
              "root": engine.config.model_id, "parent": None, "max_model_len": engine.max_model_len}]
    for d in engine.adapters.list():
        manifest = d["manifest"]
        if _may_list(principal, manifest.get("tenants") or []):
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

def sampling_params(body: _OpenAISampling, max_tokens: int | None, logprobs: int | None, i: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=seed_for(body.seed, i),
        stop=body.stop_list,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        include_stop_str_in_output=body.include_stop_str_in_output,
        logprobs=logprobs,
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length") else "stop"


class _Run:
    """One OpenAI request from validation to its answer; subclasses shape the chunks."""

    object_name = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, state: ServerState, request: Request, body: _OpenAISampling):
        self.state, self.request, self.body = state, request, body
        self.timer = RequestTimer(state.metrics, UNKNOWN)
        self.request_id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.target: Target | None = None
        self.seqs = []
        self.n = body.n

    # subclass hooks
    def prompts(self, engine) -> list[str | list[int]]:
        raise NotImplementedError

    def params(self, i: int) -> SamplingParams:
        raise NotImplementedError

    def choice(self, index: int, result) -> dict:
        raise NotImplementedError

    def chunk_choices(self, index: int, out, first: bool) -> dict | None:
        raise NotImplementedError

    @property
    def tokenizer(self):
        return self.state.require_engine().engine.tokenizer  # the calling thread's own copy

    # flow
    def prepare(self) -> None:
        """Blocking (templates, tokenization, validation): runs on the prepare pool."""
        try:
            principal = self.state.auth.inference(self.request)
            self.target = resolve_model(self.state, principal, self.body.model)
            self.timer.label = self.target.label
            engine = self.state.require_engine()
            prompts = self.prompts(engine.engine)
            if len(prompts) * self.n > self.state.settings.max_n:
                raise APIError(400, f"prompts x n must be at most {self.state.settings.max_n}", param="n")
            self.seqs = make_sequences(engine, self.request_id, prompts, self.n, self.params, self.target.adapter)
            count_prompt_tokens(self.timer, self.seqs, self.n)
        except (APIError, RequestError) as exc:
            err = as_api_error(exc)
            self.timer.finish(err.status)
            raise err from None

    async def respond(self):
        await off_loop(self.state, self.prepare)
        if self.body.stream:
            return sse_response(self.stream())
        try:
            results = await until_disconnect(self.request, collect(self.state, self.seqs, self.timer, self.target.adapter))
        except ClientGone:
            self.timer.finish(499)
            return Response(status_code=499)
        except APIError as err:
            self.timer.finish(err.status)
            raise
        self.timer.finish(200)
        return JSONResponse({
            "id": self.request_id, "object": self.object_name, "created": self.created, "model": self.target.model,
            "choices": [self.choice(i, r) for i, r in enumerate(results)],
            "usage": usage(self.timer.prompt_tokens, self.timer.completion_tokens),
        })

    def _chunk(self, choices: list[dict]) -> dict:
        return {"id": self.request_id, "object": self.chunk_object, "created": self.created,
                "model": self.target.model, "choices": choices}

    async def stream(self):
        status = 499  # until the stream completes (a disconnect leaves it so)
        completion = [0] * len(self.seqs)
        started = [False] * len(self.seqs)
        stream = merge_streams(self.state.engine, self.seqs)
        try:
            try:
                async for i, out in stream:
                    self.timer.tokens(len(out.new_token_ids))
                    completion[i] = out.completion_tokens
                    if out.finished and (out.finish_reason == "abort" or out.error):
                        raise output_error(self.state, self.target.adapter, out.error)
                    choice = self.chunk_choices(i, out, not started[i])
                    started[i] = True
                    if choice is not None:
                        yield sse(self._chunk([choice]))
            except (APIError, RequestError) as exc:
                err = as_api_error(exc)
                status = err.status
                yield sse(err.body())
                yield DONE
                return
            if self.body.include_usage:
                chunk = self._chunk([])
                chunk["usage"] = usage(self.timer.prompt_tokens, sum(completion))
                yield sse(chunk)
            yield DONE
            status = 200
        finally:
            self.timer.completion_tokens = sum(completion)
            self.timer.finish(status)
            await stream.aclose()


# ---- completions ------------------------------------------------------------------------------

class CompletionRun(_Run):
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"
    body: CompletionRequest

    def __init__(self, *args):
        super().__init__(*args)
        self.offsets: dict[int, int] = {}

    def prompts(self, engine):
        try:
            return self.body.prompts()
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None

    def params(self, i: int) -> SamplingParams:
        return sampling_params(self.body, self.body.max_tokens, self.body.logprobs, i)

    def logprobs(self, index: int, lps: list[TokenLogprob]) -> dict | None:
        if self.body.logprobs is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        offset = self.offsets.get(index, 0)
        for lp in lps:
            text = token_text(self.tokenizer, lp.token_id)
            top = {token_text(self.tokenizer, t): finite(v) for t, v in lp.top}
            top.setdefault(text, finite(lp.logprob))
            tokens.append(text)
            values.append(finite(lp.logprob))
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        self.offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def choice(self, index: int, r) -> dict:
        return {"index": index, "text": r.text, "logprobs": self.logprobs(index, r.logprobs),
                "finish_reason": finish_reason(r.finish_reason), "stop_reason": r.stop_reason}

    def chunk_choices(self, index: int, out, first: bool) -> dict | None:
        if not out.new_text and not out.finished and not (self.body.logprobs is not None and out.logprobs):
            return None
        return {"index": index, "text": out.new_text, "logprobs": self.logprobs(index, out.logprobs),
                "finish_reason": finish_reason(out.finish_reason) if out.finished else None,
                "stop_reason": out.stop_reason if out.finished else None}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return await CompletionRun(get_state(request), request, body).respond()


# ---- chat ---------------------------------------------------------------------------------------

def render_chat(tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The prompt token ids from the tokenizer's chat template (add_generation_prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    messages = []
    for m in body.messages:
        msg = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt,
                                             **(body.chat_template_kwargs or {}))
    except Exception as exc:  # jinja2 errors, raise_exception() in templates, bad kwargs
        raise APIError(400, f"the chat template could not render these messages: {exc}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


class ChatRun(_Run):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    body: ChatCompletionRequest

    def prompts(self, engine):
        return [render_chat(engine.tokenizer, self.body)]

    def params(self, i: int) -> SamplingParams:
        k = None
        if self.body.logprobs:
            k = self.body.top_logprobs or 0
        return sampling_params(self.body, self.body.max_new_tokens, k, i)

    def logprobs(self, lps: list[TokenLogprob]) -> dict | None:
        if not self.body.logprobs:
            return None

        def entry(token_id: int, value: float) -> dict:
            text = token_text(self.tokenizer, token_id)
            return {"token": text, "logprob": finite(value), "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    def choice(self, index: int, r) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": r.text},
                "logprobs": self.logprobs(r.logprobs), "finish_reason": finish_reason(r.finish_reason),
                "stop_reason": r.stop_reason}

    def chunk_choices(self, index: int, out, first: bool) -> dict | None:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if out.new_text or first:
            delta["content"] = out.new_text
        has_lp = bool(self.body.logprobs and out.logprobs)
        if not delta and not out.finished and not has_lp:
            return None
        return {"index": index, "delta": delta, "logprobs": self.logprobs(out.logprobs) if has_lp else None,
                "finish_reason": finish_reason(out.finish_reason) if out.finished else None}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return await ChatRun(get_state(request), request, body).respond()
