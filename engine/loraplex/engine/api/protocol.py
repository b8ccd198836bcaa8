"""Request bodies: OpenAI, LoRAX, vLLM adapter admin.

Unknown fields are ignored (OpenAI SDKs and lorax-client send fields this server has no use
for). Types and ranges are checked here or by `SamplingParams.validate`; both give 400s.
Fields that would change the answer but are not supported are refused rather than ignored.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _unsupported(name: str, why: str = "") -> ValueError:
    return ValueError(f"{name} is not supported by this server{': ' + why if why else ''}")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _OpenAISampling(_Body):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] | None = None

    min_tokens: int = 0
    # vLLM guided decoding (structured output); see structured.py
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v):
        # OpenAI keys are token ids as strings; checked against the vocabulary by the route.
        if v:
            for key in v:
                if not key.lstrip("-").isdigit():
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_OpenAISampling):
    prompt: PromptType
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise _unsupported("suffix")
        return v

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise _unsupported("best_of other than n")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(_Body):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text" or self.text is None:
            raise _unsupported(f"content part type {self.type!r}", "only text parts")
        return self


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call they answer

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    # `schema` shadows a pydantic BaseModel attribute, hence the alias
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format json_schema needs json_schema.schema")
        return self


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoiceFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True  # vLLM extension
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM extension

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- LoRAX ----------------------------------------------------------------------------------

class LoraxResponseFormat(_Body):
    """LoRAX: {"type": "json_object", "schema": {...}}; no schema means any JSON object."""

    type: Literal["json_object", "json_schema"] = "json_object"
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class MergedAdapters(_Body):
    """LoRAX: merge these adapters for this request (engine/loraplex/engine/core/adapters/merge.py)."""

    ids: list[str]
    weights: list[float]
    merge_strategy: str | None = None  # linear (default), ties, dare_linear, dare_ties
    density: float = 1.0
    majority_sign_method: str | None = None  # total (default), frequency


class LoraxParameters(_Body):
    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    ignore_eos_token: bool = False
    repetition_penalty: float | None = None
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    best_of: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = None
    response_format: LoraxResponseFormat | None = None

    @field_validator("adapter_source")
    @classmethod
    def _source(cls, v):
        if v is not None and v not in ("hub", "local", "s3"):
            raise ValueError(f"adapter_source must be hub, local or s3, not {v!r}")
        return v

    @model_validator(mode="after")
    def _unsupported_fields(self):
        if self.merged_adapters is not None and self.adapter_id:
            raise ValueError("give adapter_id or merged_adapters, not both")
        if self.best_of not in (None, 1):
            raise _unsupported("best_of > 1")
        if self.watermark:
            raise _unsupported("watermark")
        if self.truncate is not None and self.truncate < 1:
            raise ValueError("truncate must be a positive integer")
        if self.return_k_alternatives is not None and not 1 <= self.return_k_alternatives <= 20:
            raise ValueError("return_k_alternatives must be between 1 and 20")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be strictly positive")
        return self


class LoraxRequest(_Body):
    inputs: str = Field(min_length=1)
    parameters: LoraxParameters = Field(default_factory=LoraxParameters)
    stream: bool = False

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, v):
        return {} if v is None else v


# ---- adapter admin --------------------------------------------------------------------------

class LoadLoraAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
