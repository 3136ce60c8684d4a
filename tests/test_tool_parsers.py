"""Tool-call output parsers (``--tool-call-parser``) on the formats real models print.

The samples are written by hand after each family's documented format (Qwen2.5/Qwen3 and Hermes 2
Pro ``<tool_call>`` blocks, Llama 3.1-3.3 JSON calls, Mistral's two ``[TOOL_CALLS]`` forms). Every
sample is also streamed in pieces of every size: the assembled stream must equal the one-shot
parse, and no piece of content may carry tool-call markup.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quire.structured.tool_parsers import (
    ParsedOutput,
    ParserDelta,
    assemble,
    get_tool_parser,
    tool_parser_names,
)

Call = tuple[str, dict[str, Any]]

# (parser, model output, expected content, expected calls)
WELL_FORMED: list[tuple[str, str, str | None, list[Call]]] = [
    (  # Qwen2.5-Instruct: one call, nothing else
        "hermes",
        '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", '
        '"unit": "celsius"}}\n</tool_call>',
        None,
        [("get_current_temperature", {"location": "San Francisco, CA, USA", "unit": "celsius"})],
    ),
    (  # Qwen2.5: two parallel calls
        "hermes",
        '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
        "</tool_call>\n<tool_call>\n"
        '{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", "date": "2024-10-01"}}'
        "\n</tool_call>",
        None,
        [
            ("get_current_temperature", {"location": "San Francisco, CA, USA"}),
            ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"}),
        ],
    ),
    (  # Qwen3 with its thinking left in the text (no reasoning parser): text before the call
        "hermes",
        "<think>\nThe user wants the weather in São Paulo; I'll call the tool.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "São Paulo", "days": 3}}\n</tool_call>',
        "<think>\nThe user wants the weather in São Paulo; I'll call the tool.\n</think>",
        [("get_weather", {"city": "São Paulo", "days": 3})],
    ),
    (  # Hermes 2 Pro: arguments first, nested values, escapes inside strings
        "hermes",
        "Sure, let me look that up.\n<tool_call>\n"
        '{"arguments": {"symbol": "TSLA", "filters": {"fields": ["pe", "eps"], "note": "a \\"quoted\\" }"}}, '
        '"name": "get_stock_fundamentals"}\n</tool_call>\n',
        "Sure, let me look that up.",
        [
            (
                "get_stock_fundamentals",
                {"symbol": "TSLA", "filters": {"fields": ["pe", "eps"], "note": 'a "quoted" }'}},
            )
        ],
    ),
    (  # the tags inside an argument string do not end the block: the object does
        "hermes",
        '<tool_call>\n{"name": "write_file", "arguments": {"text": "a </tool_call> b <tool_call> c", '
        '"n": "</tool_"}}\n</tool_call>\nSaved.',
        "Saved.",
        [("write_file", {"text": "a </tool_call> b <tool_call> c", "n": "</tool_"})],
    ),
    (  # ... also right after the opening tag, with no spacing, and as the whole argument
        "hermes",
        '<tool_call>{"name":"f","arguments":{"x":"</tool_call>"}}</tool_call>',
        None,
        [("f", {"x": "</tool_call>"})],
    ),
    (  # the model stopped at EOS right after the object, before the closing tag
        "hermes",
        '<tool_call>\n{"name": "search", "arguments": {"query": "quire"}}\n',
        None,
        [("search", {"query": "quire"})],
    ),
    (  # Llama 3.1: a bare JSON call
        "llama3_json",
        '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}',
        None,
        [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})],
    ),
    (  # Llama 3.1 with the python tag kept (skip_special_tokens=false), and an empty argument list
        "llama3_json",
        '<|python_tag|>{"name": "get_time", "parameters": {}}',
        None,
        [("get_time", {})],
    ),
    (  # Llama 3.2: several calls separated by ';'
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_weather", "parameters": {"city": "Zürich"}};{"name": "get_time", "parameters": {"tz": "CET"}}',
        None,
        [
            ("get_weather", {"city": "Paris"}),
            ("get_weather", {"city": "Zürich"}),
            ("get_time", {"tz": "CET"}),
        ],
    ),
    (  # Mistral 7B v0.3: a JSON list after the control token
        "mistral",
        '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
        '"format": "celsius"}}, {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]',
        None,
        [
            ("get_current_weather", {"location": "Paris, France", "format": "celsius"}),
            ("get_time", {"tz": "Europe/Paris"}),
        ],
    ),
    (  # markers and separators inside argument strings are text
        "llama3_json",
        '{"name": "run", "parameters": {"code": "a; {b} <|python_tag|>"}}; {"name": "f", "parameters": {"s": "}"}}',
        None,
        [("run", {"code": "a; {b} <|python_tag|>"}), ("f", {"s": "}"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]note[ARGS]{"text": "see [TOOL_CALLS]x[ARGS]{} and ]"}[TOOL_CALLS] [{"name": "g", '
        '"arguments": {"t": "[TOOL_CALLS]"}}]',
        None,
        [("note", {"text": "see [TOOL_CALLS]x[ARGS]{} and ]"}), ("g", {"t": "[TOOL_CALLS]"})],
    ),
    (  # Mistral Small 3.2 / Devstral: name[ARGS]{...} per call, text before
        "mistral",
        'I will check both cities.[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris", "unit": "celsius"}'
        '[TOOL_CALLS]get_current_weather[ARGS]{"location": "Lyon", "unit": "celsius"}',
        "I will check both cities.",
        [
            ("get_current_weather", {"location": "Paris", "unit": "celsius"}),
            ("get_current_weather", {"location": "Lyon", "unit": "celsius"}),
        ],
    ),
]

# Output that looks like a call but is not one: it stays content, unchanged.
MALFORMED: list[tuple[str, str]] = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "not json"}\n</tool_call>'),
    ("hermes", "<tool_call>\nget_weather(city='Paris')\n</tool_call>"),
    ("hermes", 'Here: <tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call> done'),  # no name
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'),  # cut by max_tokens
    ("hermes", "a stray <tool_call>"),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}} and more\n</tool_call> after'),  # text after it
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": "</tool_call>"}'),  # the object never closes
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_'),  # cut inside the closing tag
    ("llama3_json", '{"answer": 42, "unit": "km"}'),  # a JSON answer, not a call
    ("llama3_json", '{"name": "Ada Lovelace", "born": 1815}'),  # has a name, is no call
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Par'),
    ("llama3_json", "The weather is {sunny}."),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather"}, 1]'),
    ("mistral", "[TOOL_CALLS]get weather now[ARGS]{}"),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]["Paris"]'),
    ("mistral", "[TOOL_CALLS]get_weather"),
    ("mistral", "text then [TOOL_CALLS]"),
]

MARKERS = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3_json": (),
    "mistral": ("[TOOL_CALLS]", "[ARGS]"),
}


def _stream(parser_name: str, pieces: list[str]) -> list[ParserDelta]:
    stream = get_tool_parser(parser_name).stream()
    return [stream.feed(piece) for piece in pieces] + [stream.finish()]


def _pieces(text: str, rng: random.Random, max_size: int) -> list[str]:
    pieces, at = [], 0
    while at < len(text):
        size = rng.randint(1, max_size)
        pieces.append(text[at : at + size])
        at += size
    return pieces


def _calls(parsed: ParsedOutput) -> list[Call]:
    return [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls]


def test_registry_has_vllms_names() -> None:
    assert {"hermes", "llama3_json", "mistral"} <= set(tool_parser_names())
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'; known: hermes"):
        get_tool_parser("nope")
    # Markers that are special tokens in some of the family's tokenizers must stay in the text.
    assert get_tool_parser("mistral").keeps_special_tokens
    assert get_tool_parser("hermes").keeps_special_tokens
    assert not get_tool_parser("llama3_json").keeps_special_tokens


@pytest.mark.parametrize(("parser", "text", "content", "calls"), WELL_FORMED)
def test_one_shot_parse(parser: str, text: str, content: str | None, calls: list[Call]) -> None:
    parsed = get_tool_parser(parser).parse(text)
    assert parsed.content == content
    assert _calls(parsed) == calls
    ids = [call.id for call in parsed.tool_calls]
    assert len(set(ids)) == len(ids)
    if parser == "mistral":  # Mistral's templates insist on 9 alphanumerics
        assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)
    else:
        assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    # Arguments are JSON text with non-ASCII kept as is.
    assert all("\\u" not in call.arguments for call in parsed.tool_calls)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), WELL_FORMED)
@pytest.mark.parametrize("max_piece", [1, 3, 8, 1000])
def test_stream_assembles_to_the_one_shot_parse(
    parser: str, text: str, content: str | None, calls: list[Call], max_piece: int
) -> None:
    rng = random.Random(max_piece)
    for _ in range(5 if max_piece > 1 else 1):
        deltas = _stream(parser, _pieces(text, rng, max_piece))
        parsed = assemble(deltas)
        assert parsed.content == content
        assert _calls(parsed) == calls
        for delta in deltas:
            for marker in MARKERS[parser]:
                assert marker not in delta.content
            if parser == "llama3_json":
                assert '"parameters"' not in delta.content
        # Each call: one header piece (id, name, no arguments), then argument pieces without an id.
        pieces = [piece for delta in deltas for piece in delta.tool_calls]
        for index in range(len(calls)):
            own = [p for p in pieces if p.index == index]
            assert own[0].id and own[0].name == calls[index][0] and own[0].arguments == ""
            assert all(p.id is None and p.name is None for p in own[1:])


@pytest.mark.parametrize(("parser", "text"), MALFORMED)
def test_malformed_output_stays_content(parser: str, text: str) -> None:
    parsed = get_tool_parser(parser).parse(text)
    assert parsed.tool_calls == []
    assert parsed.content == text
    for max_piece in (1, 2, 5):
        streamed = assemble(_stream(parser, _pieces(text, random.Random(0), max_piece)))
        assert streamed == ParsedOutput(text, [])


def test_calls_before_a_malformed_one_stand() -> None:
    text = '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": '
    parsed = get_tool_parser("llama3_json").parse(text)
    assert _calls(parsed) == [("a", {})]
    assert parsed.content == '; {"name": "b", "parameters": {"x":'  # spacing next to calls is dropped
    hermes = get_tool_parser("hermes").parse(
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{oops}\n</tool_call>'
    )
    assert _calls(hermes) == [("a", {})]
    assert hermes.content == "<tool_call>\n{oops}\n</tool_call>"


def test_a_malformed_block_ends_at_its_closing_tag() -> None:
    # An object that never closes cannot swallow the blocks after it: it ends at the first
    # closing tag, as markup, and the next block is still a call.
    text = (
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"y": "}"}}\n</tool_call>'
    )
    parsed = get_tool_parser("hermes").parse(text)
    assert _calls(parsed) == [("b", {"y": "}"})]
    assert parsed.content == '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>'
    for max_piece in (1, 4):
        streamed = assemble(_stream("hermes", _pieces(text, random.Random(1), max_piece)))
        assert streamed.content == parsed.content and _calls(streamed) == _calls(parsed)


def test_text_around_calls() -> None:
    parsed = get_tool_parser("hermes").parse(
        'First this.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>\nThen that.\n'
    )
    assert parsed.content == "First this.\nThen that."
    assert [c.name for c in parsed.tool_calls] == ["a", "b"]
    after = get_tool_parser("hermes").parse('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n\nDone.')
    assert after.content == "Done."


def test_partial_markers_are_held_back_not_leaked() -> None:
    stream = get_tool_parser("hermes").stream()
    assert stream.feed("Checking <tool").content == "Checking"  # the space waits too
    later = stream.feed('_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_c')
    assert later.content == "" and later.tool_calls == []
    done = stream.feed("all>")
    assert [(p.name, p.arguments) for p in done.tool_calls] == [("f", ""), (None, '{"a": 1}')]
    assert not stream.finish()
    # Held-back text that never becomes a marker comes out at the end, unchanged.
    stream = get_tool_parser("mistral").stream()
    assert stream.feed("array[TOOL").content == "array"
    assert stream.finish().content == "[TOOL"
    stream = get_tool_parser("llama3_json").stream()
    assert stream.feed("  <|python").content == ""
    assert stream.feed("ic|> no").content == "  <|pythonic|> no"


_PLAIN = st.text(alphabet=st.sampled_from(list('ab {}[]<>;:"\\/_|\n\té東🙂')), max_size=60)


@settings(max_examples=150, deadline=None)
@given(text=_PLAIN, seed=st.integers(0, 2**16), parser=st.sampled_from(["hermes", "llama3_json", "mistral"]))
def test_text_without_calls_is_content_unchanged_however_split(text: str, seed: int, parser: str) -> None:
    if parser == "llama3_json" and text.lstrip().startswith("{"):
        text = "x" + text  # a JSON-looking start is the call syntax of this format
    deltas = _stream(parser, _pieces(text, random.Random(seed), 4))
    assert assemble(deltas) == ParsedOutput(text or None, [])
