"""LoRAX-compatible routes: POST /generate, /generate_stream, and POST / (what lorax-client calls).

`parameters.adapter_id` picks the adapter (none: the base). An unregistered adapter_id without
`adapter_source` is looked up in the default source (--adapter-source), loaded just in time and
served, as LoRAX does (see `resolve_dynamic`). One with an `adapter_source` is registered on the
fly when the caller may administer adapters (the admin token, or no admin token configured). Adapter ids that are not DNS-1123
labels (Hub repos like `org/name`) get a stable derived name (see `adapter_name_for`).
Errors carry the OpenAI shape plus `error_type`; a failure mid-stream is one
`data: {"error": ..., "error_type": ...}` event (LoRAX streams have no [DONE]).
"""
from __future__ import annotations

import asyncio
import secrets
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from loraplex.engine.api.auth import Authenticator
from loraplex.engine.api.errors import APIError, ClientGone, as_api_error, finite, lorax_error_type
from loraplex.engine.api.metrics import UNKNOWN, RequestTimer
from loraplex.engine.api.protocol import LoraxParameters, LoraxRequest
from loraplex.engine.api.structured import compile_grammar, lorax_spec
from loraplex.engine.api.serving import (ServerState, adapter_name_for, collect, count_prompt_tokens, get_state, make_sequences,
                                  merge_streams, off_loop, output_error, resolve_dynamic, resolve_model, sse, sse_response, token_text,
                                  until_disconnect, wait_for_adapter)
from loraplex.engine.core.adapters.merge import MergeSpec, ensure_merged
from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.manifest import AdapterManifest

router = APIRouter()
DEFAULT_MAX_NEW_TOKENS = 20
ENGINE_PARAMS = {"prompt": "inputs", "max_tokens": "parameters.max_new_tokens", "model": "parameters.adapter_id",
                 **{f: f"parameters.{f}" for f in ("temperature", "top_p", "top_k", "typical_p", "repetition_penalty", "seed",
                                                    "stop", "logprobs")}}


class LoraxRun:
    def __init__(self, state: ServerState, request: Request, body: LoraxRequest):
        self.state, self.request, self.body = state, request, body
        self.p: LoraxParameters = body.parameters
        self.timer = RequestTimer(state.metrics, UNKNOWN)
        self.request_id = f"gen-{uuid.uuid4().hex}"
        self.sampling = bool(self.p.do_sample or self.p.temperature not in (None, 1.0)
                             or self.p.top_k not in (None, 0) or self.p.top_p not in (None, 1.0)
                             or self.p.typical_p not in (None, 1.0))
        self.seed = self.p.seed
        if self.sampling and self.seed is None:
            self.seed = secrets.randbelow(2**63)  # reported in details, so the answer can be reproduced
        self.grammar = None  # CompiledGrammar for parameters.response_format

    def _adapter(self, principal) -> str | None:
        aid = self.p.adapter_id
        engine = self.state.require_engine().engine
        if not aid or aid in (engine.served_model_name, engine.config.model_id):
            return None
        mgr = engine.adapters
        name = adapter_name_for(aid)
        for candidate in (aid, name):
            if mgr.manifest(candidate) is not None:
                return candidate
        if self.p.adapter_source is None:
            return aid  # unknown: resolve_model answers 404
        if not self.state.auth.may_register(principal):
            raise APIError(403, "loading an adapter by adapter_source needs the admin token",
                           code="forbidden", param="parameters.adapter_source")
        try:
            manifest = AdapterManifest(name=name, source=self.p.adapter_source, uri=aid)
        except ValidationError as exc:
            raise APIError(400, f"cannot load adapter {aid!r} from {self.p.adapter_source}: "
                           f"{exc.errors()[0]['msg']}", param="parameters.adapter_id") from None
        mgr.register(manifest)
        return name

    def params(self, i: int) -> SamplingParams:
        p = self.p
        return SamplingParams(
            max_tokens=DEFAULT_MAX_NEW_TOKENS if p.max_new_tokens is None else p.max_new_tokens,
            temperature=(1.0 if p.temperature is None else p.temperature) if self.sampling else 0.0,
            top_p=1.0 if p.top_p is None else p.top_p,
            top_k=0 if p.top_k is None else p.top_k,
            typical_p=1.0 if p.typical_p is None else p.typical_p,
            repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
            seed=self.seed,
            stop=list(p.stop),
            ignore_eos=p.ignore_eos_token,
            logprobs=p.return_k_alternatives or 0,  # every LoRAX token carries its logprob
            prompt_logprobs=p.decoder_input_details,
            grammar=self.grammar.matcher() if self.grammar is not None else None,
        )

    async def _merged(self, principal) -> str:
        """The adapter name of parameters.merged_adapters, merged now or found in the cache."""
        m = self.p.merged_adapters
        spec = MergeSpec(tuple(m.ids), tuple(m.weights), m.merge_strategy or "linear", m.density,
                         m.majority_sign_method or "total").validate()
        mgr = self.state.require_engine().engine.adapters
        for adapter in spec.ids:
            manifest = mgr.manifest(adapter)
            # Another tenant's adapter answers exactly as a missing one (it must not be told apart).
            if manifest is None or not Authenticator.may_use(principal, manifest):
                raise RequestError(f"merged_adapters: the adapter {adapter!r} does not exist",
                                   param="merged_adapters.ids")
        return await wait_for_adapter(self.state, asyncio.to_thread(ensure_merged, mgr, spec), spec.name,
                                      param="merged_adapters")

    @property
    def tokenizer(self):
        return self.state.require_engine().engine.tokenizer  # the calling thread's own copy

    async def prepare(self) -> None:
        aid = self.p.adapter_id
        engine = self.state.engine
        if self.p.adapter_source is None and not (aid and engine and engine.engine.adapters.manifest(adapter_name_for(aid))):
            await resolve_dynamic(self.state, self.request, self.p.adapter_id, self.timer, param="parameters.adapter_id")
        try:
            principal = self.state.auth.inference(self.request)
            adapter = await self._merged(principal) if self.p.merged_adapters else self._adapter(principal)
            target = resolve_model(self.state, principal, adapter, param="parameters.adapter_id")
            self.target = target
            self.timer.label = target.label
            engine = self.state.require_engine()
            self.grammar = await compile_grammar(self.state, lorax_spec(self.p.response_format))
            self.special = set(self.tokenizer.all_special_ids)
            self.seqs = await off_loop(self.state, self._make_sequences, engine)
            count_prompt_tokens(self.timer, self.seqs, 1)
        except (APIError, RequestError) as exc:
            err = as_api_error(exc)
            if err.param in ENGINE_PARAMS:  # the engine names its fields; LoRAX callers know these
                err.param = ENGINE_PARAMS[err.param]
            elif err.param and err.param.startswith("merged_adapters"):
                err.param = f"parameters.{err.param}"
            self.timer.finish(err.status)
            raise err from None

    def _make_sequences(self, engine) -> list:
        """Blocking (tokenization, validation): runs on the prepare pool, off the event loop."""
        prompt: str | list[int] = self.body.inputs
        if self.p.truncate is not None:
            prompt = engine.engine.tokenize(prompt)[-self.p.truncate:]
        return make_sequences(engine, self.request_id, [prompt], 1, self.params, self.target.adapter)

    # ---- shapes --------------------------------------------------------------------------

    def token(self, token_id: int, logprob, text: str | None = None) -> dict:
        tok = {"id": token_id, "text": token_text(self.tokenizer, token_id) if text is None else text,
               "logprob": finite(logprob.logprob) if logprob is not None else 0.0,
               "special": token_id in self.special}
        if self.p.return_k_alternatives and logprob is not None:
            tok["alternative_tokens"] = [{"id": t, "text": token_text(self.tokenizer, t), "logprob": finite(v)}
                                         for t, v in logprob.top]
        return tok

    @staticmethod
    def finish_reason(reason: str | None, stop_reason) -> str:
        if reason == "length":
            return "length"
        return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"

    def full_text(self, text: str) -> str:
        return self.body.inputs + text if self.p.return_full_text else text

    def prefill(self, result) -> list[dict]:
        if not self.p.decoder_input_details:
            return []
        ids = self.seqs[0].prompt_ids
        lps = result.prompt_logprobs or [None] * len(ids)
        return [{"id": t, "text": token_text(self.tokenizer, t), "logprob": None if lp is None else finite(lp)}
                for t, lp in zip(ids, lps)]

    # ---- answers --------------------------------------------------------------------------

    async def generate(self) -> dict:
        await self.prepare()
        try:
            results = await until_disconnect(self.request, collect(self.state, self.seqs, self.timer, self.target.adapter))
        except ClientGone:
            self.timer.finish(499)
            raise
        except APIError as err:
            self.timer.finish(err.status)
            raise
        self.timer.finish(200)
        r = results[0]
        answer: dict = {"generated_text": self.full_text(r.text)}
        if self.p.details:
            answer["details"] = {
                "finish_reason": self.finish_reason(r.finish_reason, r.stop_reason),
                "prompt_tokens": self.timer.prompt_tokens,
                "generated_tokens": r.completion_tokens,
                "seed": self.seed if self.sampling else None,
                "prefill": self.prefill(r),
                "tokens": [self.token(t, lp) for t, lp in zip(r.token_ids, r.logprobs + [None] * len(r.token_ids))],
                "best_of_sequences": None,
            }
        return answer

    async def stream(self):
        status = 499
        text = ""
        generated = 0
        stream = merge_streams(self.state.engine, self.seqs)
        try:
            try:
                async for _, out in stream:
                    self.timer.tokens(len(out.new_token_ids))
                    generated = out.completion_tokens
                    if out.finished and (out.finish_reason == "abort" or out.error):
                        raise output_error(self.state, self.target.adapter, out.error, out.error_code)
                    text += out.new_text
                    ids = out.new_token_ids
                    for j, token_id in enumerate(ids):
                        last = j == len(ids) - 1
                        lp = out.logprobs[j] if j < len(out.logprobs) else None
                        event = {"token": self.token(token_id, lp, text=out.new_text if last else ""),
                                 "generated_text": None, "details": None}
                        if last and out.finished:
                            event["generated_text"] = self.full_text(text)
                            if self.p.details:
                                event["details"] = {
                                    "finish_reason": self.finish_reason(out.finish_reason, out.stop_reason),
                                    "prompt_tokens": out.prompt_tokens, "generated_tokens": out.completion_tokens,
                                    "seed": self.seed if self.sampling else None}
                        yield sse(event)
            except (APIError, RequestError) as exc:
                err = as_api_error(exc)
                status = err.status
                # mid-stream the status is already 200: error_type alone tells lorax-client what failed
                yield sse({**err.body(), "error_type": lorax_error_type(err.status) or "generation"})
                return
            status = 200
        finally:
            self.timer.completion_tokens = generated
            self.timer.finish(status)
            await stream.aclose()

    async def stream_response(self):
        await self.prepare()
        return sse_response(self.stream())


@router.post("/generate")
async def generate(body: LoraxRequest, request: Request):
    try:
        return await LoraxRun(get_state(request), request, body).generate()
    except ClientGone:
        return Response(status_code=499)


@router.post("/generate_stream")
async def generate_stream(body: LoraxRequest, request: Request):
    return await LoraxRun(get_state(request), request, body).stream_response()


@router.post("/")
async def compat_generate(body: LoraxRequest, request: Request):
    """lorax-client's endpoint: `stream` picks SSE; otherwise a one-element JSON list."""
    run = LoraxRun(get_state(request), request, body)
    if body.stream:
        return await run.stream_response()
    try:
        return JSONResponse([await run.generate()])
    except ClientGone:
        return Response(status_code=499)
