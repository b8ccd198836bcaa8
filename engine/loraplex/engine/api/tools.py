"""Tool calling for chat completions, on the output side (text is parsed here, in the HTTP layer,
never on the step loop).

- `tool_choice` `auto` (the default when tools are given): the model decides; its text is parsed
  by the model family's parser. `none`: tools are still rendered in the prompt, nothing is parsed.
- `required` / a named function: the grammar engine constrains the output (vLLM's way, the same
  for every family): a named function's output is its `arguments` object, valid against its
  `parameters` schema; `required` outputs a JSON array of `{"name", "parameters"}`, one entry
  per call, each valid against its function's schema.

Parsers per family (`--tool-call-parser`, or detected from the chat template):
- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2/2.5/3);
- `llama3_json`: the output is one JSON object `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`; several separated by `;`), as Llama 3.1-3.3 emit.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from loraplex.engine.api.errors import APIError
from loraplex.engine.core.structured_output import GrammarSpec

PARSERS = ("auto", "hermes", "llama3_json")


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _call_from_json(obj) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesParser:
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content before the first call, the calls). No well-formed call: (text, [])."""
        if self.START not in text:
            return text, []
        calls = []
        for block in self.BLOCK.findall(text):
            try:
                call = _call_from_json(json.loads(block))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        if not calls:
            return text, []
        content = text[:text.index(self.START)].strip()
        return content or None, calls


class Llama3JsonParser:
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].strip()
        if not body.startswith("{"):
            return text, []
        decoder = json.JSONDecoder()
        calls, pos = [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return text, []
            call = _call_from_json(obj)
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return None, calls


def parser_for(name: str, chat_template: str | None):
    """The parser named by --tool-call-parser; `auto` looks at the chat template."""
    if name == "auto":
        template = chat_template or ""
        name = "llama3_json" if ("<|python_tag|>" in template or "ipython" in template) else "hermes"
    return {"hermes": HermesParser, "llama3_json": Llama3JsonParser}[name]()


class StreamingToolParser:
    """Feeds text deltas; returns (content to send now, calls completed now). Content that could
    be the start of a tool call is held back until it is clear."""

    def __init__(self, parser):
        self.parser = parser
        self.pending = ""  # text not yet sent as content
        self.in_calls = False  # a call has started: held back until it can be parsed

    def feed(self, delta: str, final: bool) -> tuple[str, list[ParsedCall]]:
        self.pending += delta
        if isinstance(self.parser, Llama3JsonParser):
            return self._feed_llama3(final)
        return self._feed_hermes(final)

    def _feed_llama3(self, final: bool) -> tuple[str, list[ParsedCall]]:
        if not self.in_calls:
            head = self.pending.lstrip()
            if not head:
                return ("", []) if not final else (self._take(), [])
            tag = Llama3JsonParser.TAG
            if head.startswith("{") or head.startswith(tag):
                self.in_calls = True
            elif tag.startswith(head) and not final:
                return "", []
            else:
                return self._take(), []  # plain text: stream it as it comes
        if not final:
            return "", []
        content, calls = self.parser.parse(self._take())
        return content or "", calls

    def _feed_hermes(self, final: bool) -> tuple[str, list[ParsedCall]]:
        start, end = HermesParser.START, HermesParser.END
        out, calls = "", []
        while True:
            if not self.in_calls:
                i = self.pending.find(start)
                if i == -1:
                    keep = 0 if final else _partial_suffix(self.pending, start)
                    out += self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    return out, calls
                out += self.pending[:i]
                self.pending = self.pending[i:]
                self.in_calls = True
            j = self.pending.find(end)
            if j == -1:
                if final:  # an unfinished call: not a call, send it as text
                    out += self._take()
                return out, calls
            block, self.pending = self.pending[:j + len(end)], self.pending[j + len(end):]
            _, parsed = self.parser.parse(block)
            if parsed:
                calls += parsed
            else:
                out += block
            self.in_calls = False

    def _take(self) -> str:
        text, self.pending = self.pending, ""
        return text


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


# ---- tool_choice ----------------------------------------------------------------------------

def tool_choice_of(body) -> str | None:
    """'none' | 'auto' | 'required' | 'named' | None (no tools)."""
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if body.tool_choice is None:
        return "auto"
    if isinstance(body.tool_choice, str):
        return body.tool_choice
    name = body.tool_choice.function.name
    if name not in {t.function.name for t in body.tools}:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools",
                       param="tool_choice")
    return "named"


def _parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def constrained_spec(body, choice: str | None) -> GrammarSpec | None:
    """The grammar of `required` / a named function (None for auto, none and no tools)."""
    if choice == "named":
        tool = next(t for t in body.tools if t.function.name == body.tool_choice.function.name)
        return GrammarSpec.json_schema(_parameters(tool), param=f"tools.{body.tools.index(tool)}.function.parameters")
    if choice == "required":
        items = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                             "parameters": _parameters(t)},
                            "required": ["name", "parameters"], "additionalProperties": False}
                           for t in body.tools]}
        schema = {"type": "array", "items": items, "minItems": 1}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return GrammarSpec.json_schema(schema, param="tools")
    return None


def constrained_calls(body, choice: str, text: str) -> list[ParsedCall]:
    """The calls in a constrained output (the grammar guarantees the shape when it finished)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if choice == "named":
        return [ParsedCall(body.tool_choice.function.name, json.dumps(value, ensure_ascii=False))]
    return [ParsedCall(v["name"], json.dumps(v["parameters"], ensure_ascii=False)) for v in value]


# ---- the chat template ----------------------------------------------------------------------

def template_messages(messages) -> list[dict]:
    """Chat messages as chat templates expect them: tool call arguments as objects (templates
    write them with `tojson`), tool results with their tool_call_id."""
    out = []
    for m in messages:
        msg = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _arguments(args):
    if isinstance(args, dict):
        return args
    try:
        value = json.loads(args)
    except ValueError:
        raise APIError(400, "tool call arguments must be a JSON object", param="messages") from None
    if not isinstance(value, dict):
        raise APIError(400, "tool call arguments must be a JSON object", param="messages")
    return value


def template_tools(tools) -> list[dict] | None:
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None
