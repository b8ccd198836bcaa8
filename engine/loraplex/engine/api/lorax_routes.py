"""LoRAX-compatible routes: POST /generate, /generate_stream, and POST / (what lorax-client calls).

`parameters.adapter_id` picks the adapter (none: the base). An unregistered adapter_id without
`adapter_source` is looked up in the default source (--adapter-source), loaded just in time and
served, as LoRAX does (see `model_resolution.resolve_model`). One with an `adapter_source` is registered on the
fly when the caller may administer adapters (the admin token, or no admin token configured). Adapter ids that are not DNS-1123
labels (Hub repos like `org/name`) get a stable derived name (see `adapter_name_for`).
Errors carry the OpenAI shape plus `error_type`; a failure mid-stream is one
`data: {"error": ..., "error_type": ...}` event (LoRAX streams have no [DONE]).
"""
from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterable

from fastapi import APIRouter, Request
from pydantic import ValidationError

from loraplex.engine.api.auth import Authenticator
from loraplex.engine.api.errors import APIError, finite, lorax_error_type
from loraplex.engine.api.lifecycle import InferenceCall, WireFormat
from loraplex.engine.api.model_resolution import adapter_name_for, wait_for_adapter
from loraplex.engine.api.protocol import LoraxParameters, LoraxRequest
from loraplex.engine.api.sse import sse
from loraplex.engine.api.state import get_state
from loraplex.engine.api.structured import lorax_spec
from loraplex.engine.core.adapters.merge import MergeSpec, ensure_merged
from loraplex.engine.core.errors import RequestError
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.sequence import RequestResult
from loraplex.manifest import AdapterManifest

router = APIRouter()
DEFAULT_MAX_NEW_TOKENS = 20
ENGINE_PARAMS = {"prompt": "inputs", "max_tokens": "parameters.max_new_tokens", "model": "parameters.adapter_id",
                 **{f: f"parameters.{f}" for f in ("temperature", "top_p", "top_k", "typical_p", "repetition_penalty", "seed",
                                                    "stop", "logprobs")}}


class LoraxWire(WireFormat):
    id_prefix = "gen"

    def __init__(self, body: LoraxRequest, stream: bool, as_list: bool = False):
        self.body, self.stream, self.as_list = body, stream, as_list
        self.p: LoraxParameters = body.parameters
        self.sampling_on = bool(self.p.do_sample or self.p.temperature not in (None, 1.0)
                                or self.p.top_k not in (None, 0) or self.p.top_p not in (None, 1.0)
                                or self.p.typical_p not in (None, 1.0))
        self.seed = self.p.seed
        if self.sampling_on and self.seed is None:
            self.seed = secrets.randbelow(2**63)  # reported in details, so the answer can be reproduced
        self.special: set[int] = set()

    # ---- the request -----------------------------------------------------------------------

    async def model_name(self, call: InferenceCall) -> str | None:
        """parameters.adapter_id, its derived name, an adapter registered from adapter_source,
        or the merge of merged_adapters."""
        if self.p.merged_adapters:
            return await self._merged(call)
        aid = self.p.adapter_id
        engine = call.engine
        if engine.is_base(aid):
            return None
        mgr = engine.adapters
        name = adapter_name_for(aid)
        for candidate in (aid, name):
            if mgr.manifest(candidate) is not None:
                return candidate
        if self.p.adapter_source is None:
            return aid  # unknown here: found just in time, or 404
        if not call.state.auth.may_register(call.principal):
            raise APIError(403, "loading an adapter by adapter_source needs the admin token",
                           code="forbidden", param="parameters.adapter_source")
        try:
            manifest = AdapterManifest(name=name, source=self.p.adapter_source, uri=aid)
        except ValidationError as exc:
            raise APIError(400, f"cannot load adapter {aid!r} from {self.p.adapter_source}: "
                           f"{exc.errors()[0]['msg']}", param="parameters.adapter_id") from None
        mgr.register(manifest)
        return name

    async def _merged(self, call: InferenceCall) -> str:
        """The adapter name of parameters.merged_adapters, merged now or found in the cache."""
        m = self.p.merged_adapters
        spec = MergeSpec(tuple(m.ids), tuple(m.weights), m.merge_strategy or "linear", m.density,
                         m.majority_sign_method or "total").validate()
        mgr = call.engine.adapters
        for adapter in spec.ids:
            manifest = mgr.manifest(adapter)
            # Another tenant's adapter answers exactly as a missing one (it must not be told apart).
            if manifest is None or not Authenticator.may_use(call.principal, manifest):
                raise RequestError(f"merged_adapters: the adapter {adapter!r} does not exist",
                                   param="merged_adapters.ids")
            if manifest.revisions is not None:  # a merge is made once: of fixed weights, not of a split
                raise RequestError(f"merged_adapters: {adapter!r} is served by revisions; name one, as "
                                   f"'{adapter}@<revision>'", param="merged_adapters.ids")
        return await wait_for_adapter(call.engine, asyncio.to_thread(ensure_merged, mgr, spec), spec.name,
                                      param="merged_adapters")

    def prepare(self, call: InferenceCall):
        self.special = set(call.engine.tokenizer.all_special_ids)
        return lorax_spec(self.p.response_format)

    def prompts(self, call: InferenceCall) -> list[str | list[int]]:
        prompt: str | list[int] = self.body.inputs
        if self.p.truncate is not None:
            prompt = call.engine.tokenize(prompt)[-self.p.truncate:]
        return [prompt]

    def sampling(self, call: InferenceCall, i: int) -> SamplingParams:
        p = self.p
        return SamplingParams(
            max_tokens=DEFAULT_MAX_NEW_TOKENS if p.max_new_tokens is None else p.max_new_tokens,
            temperature=(1.0 if p.temperature is None else p.temperature) if self.sampling_on else 0.0,
            top_p=1.0 if p.top_p is None else p.top_p,
            top_k=0 if p.top_k is None else p.top_k,
            typical_p=1.0 if p.typical_p is None else p.typical_p,
            repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
            seed=self.seed,
            stop=list(p.stop),
            ignore_eos=p.ignore_eos_token,
            logprobs=p.return_k_alternatives or 0,  # every LoRAX token carries its logprob
            prompt_logprobs=p.decoder_input_details,
            grammar=call.grammar.matcher() if call.grammar is not None else None,
        )

    def error_param(self, param: str | None) -> str | None:
        if param in ENGINE_PARAMS:  # the engine names its fields; LoRAX callers know these
            return ENGINE_PARAMS[param]
        if param and param.startswith("merged_adapters"):
            return f"parameters.{param}"
        return param

    # ---- shapes ----------------------------------------------------------------------------

    def token(self, call: InferenceCall, token_id: int, logprob, text: str | None = None) -> dict:
        tok = {"id": token_id, "text": call.token_text(token_id) if text is None else text,
               "logprob": finite(logprob.logprob) if logprob is not None else 0.0,
               "special": token_id in self.special}
        if self.p.return_k_alternatives and logprob is not None:
            tok["alternative_tokens"] = [{"id": t, "text": call.token_text(t), "logprob": finite(v)}
                                         for t, v in logprob.top]
        return tok

    @staticmethod
    def finish_reason(reason: str | None, stop_reason) -> str:
        if reason == "length":
            return "length"
        return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"

    @staticmethod
    def revision(call: InferenceCall) -> dict:
        """details.adapter_revision, for a revisioned adapter."""
        return {} if call.model.revision is None else {"adapter_revision": call.model.revision}

    def full_text(self, text: str) -> str:
        return self.body.inputs + text if self.p.return_full_text else text

    def prefill(self, call: InferenceCall, result: RequestResult) -> list[dict]:
        if not self.p.decoder_input_details:
            return []
        ids = call.seqs[0].prompt_ids
        lps = result.prompt_logprobs or [None] * len(ids)
        return [{"id": t, "text": call.token_text(t), "logprob": None if lp is None else finite(lp)}
                for t, lp in zip(ids, lps)]

    # ---- answers ---------------------------------------------------------------------------

    def answer(self, call: InferenceCall, results: list[RequestResult]):
        r = results[0]
        answer: dict = {"generated_text": self.full_text(r.text)}
        if self.p.details:
            answer["details"] = {
                "finish_reason": self.finish_reason(r.finish_reason, r.stop_reason),
                "prompt_tokens": call.timer.prompt_tokens,
                "generated_tokens": r.completion_tokens,
                "seed": self.seed if self.sampling_on else None,
                "prefill": self.prefill(call, r),
                "tokens": [self.token(call, t, lp) for t, lp in zip(r.token_ids, r.logprobs + [None] * len(r.token_ids))],
                "best_of_sequences": None,
                **self.revision(call),
            }
        return [answer] if self.as_list else answer

    def events(self, call: InferenceCall, index: int, out, first: bool) -> Iterable[str]:
        ids = out.new_token_ids
        for j, token_id in enumerate(ids):
            last = j == len(ids) - 1
            lp = out.logprobs[j] if j < len(out.logprobs) else None
            event = {"token": self.token(call, token_id, lp, text=out.new_text if last else ""),
                     "generated_text": None, "details": None}
            if last and out.finished:
                event["generated_text"] = self.full_text(call.results[0].text)
                if self.p.details:
                    event["details"] = {
                        "finish_reason": self.finish_reason(out.finish_reason, out.stop_reason),
                        "prompt_tokens": out.prompt_tokens, "generated_tokens": out.completion_tokens,
                        "seed": self.seed if self.sampling_on else None, **self.revision(call)}
            yield sse(event)

    def failure(self, call: InferenceCall, err: APIError) -> Iterable[str]:
        # mid-stream the status is already 200: error_type alone tells lorax-client what failed
        return (sse({**err.body(), "error_type": lorax_error_type(err.status) or "generation"}),)


async def _run(request: Request, body: LoraxRequest, stream: bool, as_list: bool = False):
    return await InferenceCall(get_state(request), request, LoraxWire(body, stream, as_list)).respond()


@router.post("/generate")
async def generate(body: LoraxRequest, request: Request):
    return await _run(request, body, stream=False)


@router.post("/generate_stream")
async def generate_stream(body: LoraxRequest, request: Request):
    return await _run(request, body, stream=True)


@router.post("/")
async def compat_generate(body: LoraxRequest, request: Request):
    """lorax-client's endpoint: `stream` picks SSE; otherwise a one-element JSON list."""
    return await _run(request, body, stream=body.stream, as_list=True)
