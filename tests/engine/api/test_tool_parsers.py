"""Tool call parsers per family: whole outputs and the same outputs streamed in every split."""
import json

import pytest

from loraplex.engine.api.tools import HermesParser, Llama3JsonParser, StreamingToolParser, parser_for

HERMES = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
          '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
LLAMA3 = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {"zone": "CET"}}'
EXPECTED = [("get_weather", {"city": "Rome"}), ("get_time", {"zone": "CET"})]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("parser,text,content", [(HermesParser(), HERMES, "Let me check."),
                                                 (Llama3JsonParser(), LLAMA3, None)])
def test_whole_outputs(parser, text, content):
    got_content, calls = parser.parse(text)
    assert got_content == content and _calls(calls) == EXPECTED


@pytest.mark.parametrize("parser,text,content", [(HermesParser(), HERMES, "Let me check. "),
                                                 (Llama3JsonParser(), LLAMA3, "")])
@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streamed_outputs_in_any_split(parser, text, content, step):
    stream = StreamingToolParser(parser)
    sent, calls = "", []
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    for k, piece in enumerate(pieces):
        out, new = stream.feed(piece, final=k == len(pieces) - 1)
        assert "<tool" not in out and "{" not in out  # nothing of a call leaks into content
        sent += out
        calls += new
    assert sent == content and _calls(calls) == EXPECTED


@pytest.mark.parametrize("parser", [HermesParser(), Llama3JsonParser()])
def test_plain_text_and_broken_calls_stay_text(parser):
    for text in ("Just words, no call.", "Almost <tool_call>{\"name\": 3}</tool_call>", "<tool_call>{oops",
                 '{"not": "a call"}'):
        content, calls = parser.parse(text)
        assert content == text and calls == []
        stream = StreamingToolParser(parser)
        out = "".join(stream.feed(text[i:i + 4], final=i + 4 >= len(text))[0] for i in range(0, len(text), 4))
        assert out == text


def test_parser_detected_from_the_template_or_named():
    assert parser_for("auto", "{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert parser_for("auto", "{{ '<|python_tag|>' }}{% if m.role == 'ipython' %}{% endif %}").name == "llama3_json"
    assert parser_for("auto", None).name == "hermes"
    assert parser_for("llama3_json", "<tool_call>").name == "llama3_json"
