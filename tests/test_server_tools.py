"""Tool calling end to end: a real ``quire serve`` on a tiny random-weight Qwen2-shaped model, the
official ``openai`` client, and a chat template written here in the style of Qwen2.5's (tools in
the system turn, calls as ``<tool_call>`` JSON, results as ``<tool_response>``).

With random weights the model would never write a valid call by itself: ``tool_choice``
"required" and a named function pass only because the grammar engine enforces the call's
schema, and "auto" is driven through the hermes parser by a regex that makes the model spell a
call out (``structured_outputs`` shapes the raw text that the parser then reads).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
import tokenizers
from pydantic import BaseModel, Field

from quire.sampling import SamplingParams
from quire.server.errors import APIError
from quire.server.openai.chat import render_chat_prompt
from quire.server.openai.protocol import ChatCompletionRequest, FunctionTool
from quire.server.openai.tool_choice import plan_tools
from quire.server.openai.tool_schema import (
    closed_objects,
    named_call_schema,
    parameters_of,
    required_calls_schema,
)
from quire.server.openai.tool_stream import NamedCallStream, RequiredCallsStream
from quire.server.settings import ServerSettings
from quire.structured.backend import validate_structured_outputs
from quire.structured.params import StructuredOutputsParams
from quire.structured.tool_parsers import assemble
from quire.tokenizer import Tokenizer
from quire.tokenizer.detokenizer import IncrementalDetokenizer

from server_fixtures import ServerProcess, running_server

# Our own template in Qwen2.5's style: system turn with the tool signatures, calls rendered from a
# dict of arguments with tojson, consecutive tool results grouped in one user turn.
TOOL_TEMPLATE = (
    "{%- if tools %}\n"
    "{{- '<|im_start|>system\\n' }}\n"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}\n"
    "{{- 'Functions available (one JSON signature per line):\\n<tools>' }}\n"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}\n"
    "{{- '\\n</tools>\\nTo call functions, answer with one block per call:\\n<tool_call>\\n"
    '{"name": <name>, "arguments": <object>}\\n</tool_call><|im_end|>\\n\' }}\n'
    "{%- elif messages[0].role == 'system' %}\n"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role == 'user' %}\n"
    "    {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}\n"
    "  {%- elif message.role == 'assistant' %}\n"
    "    {{- '<|im_start|>assistant' }}\n"
    "    {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}\n"
    "    {%- for call in message.tool_calls | default([]) %}\n"
    "      {%- if call.function is defined %}{%- set call = call.function %}{%- endif %}\n"
    '      {{- \'\\n<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' }}'
    "{{- call.arguments | tojson }}{{- '}\\n</tool_call>' }}\n"
    "    {%- endfor %}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "  {%- elif message.role == 'tool' %}\n"
    "    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}\n"
    "    {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}\n"
    "    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}\n"
    "  {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

MODEL = "tiny"
# The tool signatures make long prompts for the tiny tokenizer's 512-token vocabulary.
LONG_CONTEXT = ("--max-model-len", "2048", "--kv-cache-memory", "64MiB")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 20},
                "filters": {"type": "array", "items": {"$ref": "#/$defs/Filter"}, "maxItems": 2},
            },
            "required": ["query"],
            "additionalProperties": False,
            "$defs": {
                "Filter": {
                    "type": "object",
                    "properties": {"site": {"type": "string", "maxLength": 10}},
                    "required": ["site"],
                    "additionalProperties": False,
                }
            },
        },
    },
}
NO_ARGS = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, SEARCH, NO_ARGS]
SCHEMAS = {
    tool["function"]["name"]: tool["function"].get(
        "parameters", {"type": "object", "additionalProperties": False}
    )
    for tool in TOOLS
}

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Weather in Paris and in Zürich, please?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "celsius"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "clear"}'},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": '{"temperature": 11}'}]},
    {"role": "assistant", "content": "Paris: 18 °C and clear. Zürich: 11 °C."},
    {"role": "user", "content": "And tomorrow in Paris?"},
]


def _hf_conversation() -> list[dict[str, Any]]:
    """CONVERSATION as transformers' documentation writes it: arguments as dicts, text content."""
    out = []
    for message in CONVERSATION:
        message = json.loads(json.dumps(message))
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        if isinstance(message.get("content"), list):
            message["content"] = "".join(part["text"] for part in message["content"])
        out.append(message)
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Any) -> Path:
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="module")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "tools.jinja"
    path.write_text(TOOL_TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(model_dir: Path, template_file: Path) -> Iterator[ServerProcess]:
    with running_server(
        str(model_dir),
        "--served-model-name",
        MODEL,
        *LONG_CONTEXT,
        "--chat-template",
        str(template_file),
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _expected_prompt(model_dir: Path, tools: list[dict[str, Any]]) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    return hf.apply_chat_template(
        _hf_conversation(),
        tools=tools,
        chat_template=TOOL_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )


# -- request side: the conversation reaches the template as transformers passes it --------------


def test_tool_conversation_renders_as_transformers_does(model_dir: Path) -> None:
    body = ChatCompletionRequest.model_validate(
        {"messages": CONVERSATION, "tools": TOOLS, "tool_choice": "none"}
    )
    plan = plan_tools(body, ServerSettings())
    tokenizer = Tokenizer.from_dir(model_dir)
    text, ids = asyncio.run(
        render_chat_prompt(
            tokenizer, body.messages, True, chat_template=TOOL_TEMPLATE, tools=plan.template_tools
        )
    )
    expected = _expected_prompt(model_dir, TOOLS)
    assert text == expected
    assert ids == tokenizer.encode(expected, add_special_tokens=False)
    # The arguments were decoded: the template wrote an object, not a JSON string in quotes.
    assert '"arguments": {"city": "Zürich", "unit": "celsius"}' in text
    assert '<tool_response>\n{"temperature": 11}\n</tool_response>' in text
    assert '"name": "get_time"' in text and "$defs" in text


def test_template_needs_the_decoded_arguments(model_dir: Path) -> None:
    # Passed as the JSON text the API carries, a tojson template would quote them: a different prompt.
    tokenizer = Tokenizer.from_dir(model_dir)
    raw = [m for m in CONVERSATION if m["role"] != "tool"][:3]
    text = tokenizer.apply_chat_template(raw, chat_template=TOOL_TEMPLATE)
    assert '"arguments": "{\\"city\\": \\"Paris\\"' in text


# -- enforced choices: the schemas and the streams that read their output ------------------------


def _functions(*tools: dict[str, Any]) -> list[Any]:
    return [FunctionTool.model_validate(tool).function for tool in tools]


def test_required_schema_accepts_exactly_valid_calls() -> None:
    schema = required_calls_schema(_functions(WEATHER, SEARCH, NO_ARGS), parallel=True)
    good = [
        {"name": "search", "arguments": {"query": "q", "filters": [{"site": "a.org"}]}},
        {"name": "get_time", "arguments": {}},
        {"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}},
    ]
    jsonschema.validate(good, schema)
    for bad in (
        [],
        [{"name": "get_time", "arguments": {"x": 1}}],  # a function without parameters takes none
        [{"name": "search", "arguments": {"query": "q", "filters": [{"site": 3}]}}],  # via the moved $ref
        [{"name": "nope", "arguments": {}}],
        [{"arguments": {}, "name": "get_time", "extra": 1}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = required_calls_schema(_functions(WEATHER, NO_ARGS), parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good[1:] * 2, single)
    # The grammar engine compiles both (the engine's own validation, as admission runs it).
    for constraint in (schema, single, named_call_schema(_functions(SEARCH)[0])):
        validate_structured_outputs(StructuredOutputsParams(json=constraint))


def test_open_objects_are_closed_without_breaking_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"a": {"type": "string"}}},  # a parameter so named
            "free": {"type": "object", "additionalProperties": {"type": "integer"}},
            "items": {"type": "array", "items": {"anyOf": [{"type": "object", "properties": {"b": {}}}]}},
        },
    }
    closed = closed_objects(schema)
    jsonschema.Draft202012Validator.check_schema(closed)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert closed["properties"]["free"]["additionalProperties"] == {"type": "integer"}
    assert closed["properties"]["items"]["items"]["anyOf"][0]["additionalProperties"] is False
    assert set(closed["properties"]) == {"properties", "free", "items"}
    assert "additionalProperties" not in schema  # the caller's schema is left alone


_STR = {"type": "string"}
_BASE = {"type": "object", "properties": {"a": _STR}, "required": ["a"]}
# (schema, an instance it accepts that closing must keep, an instance closing should refuse or None)
_CLOSING_CASES: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]] = [
    (  # allOf branches each list some keys: closing any of them would refuse the others' keys
        {"type": "object", "allOf": [_BASE, {"properties": {"b": _STR}, "required": ["b"]}]},
        {"a": "x", "b": "y"},
        None,
    ),
    (  # properties next to an anyOf branch naming another key
        {**_BASE, "anyOf": [{"properties": {"b": _STR}, "required": ["b"]}]},
        {"a": "x", "b": "y"},
        None,
    ),
    (  # a $ref with sibling keywords, and the definition it points to
        {"$ref": "#/$defs/Base", "properties": {"b": _STR}, "required": ["b"], "$defs": {"Base": _BASE}},
        {"a": "x", "b": "y"},
        None,
    ),
    (  # the inheritance pattern: allOf of a reference and the subclass's own keys
        {
            "type": "object",
            "properties": {"pet": {"allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"b": _STR}}]}},
            "$defs": {"Base": _BASE},
        },
        {"pet": {"a": "x", "b": "y"}},
        {"pet": {"a": "x", "b": "y"}, "extra": 1},  # the outer object alone decides its keys
    ),
    (  # a required key the object does not list
        {"type": "object", "properties": {"a": _STR}, "required": ["a", "z"]},
        {"a": "x", "z": 1},
        None,
    ),
    (  # branches that only require listed keys: the object is still closed
        {
            "type": "object",
            "properties": {"a": _STR, "b": _STR},
            "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
        },
        {"b": "y"},
        {"b": "y", "c": 1},
    ),
    (  # anyOf alternatives each describe the whole value: each is closed
        {"type": "object", "properties": {"v": {"anyOf": [_BASE, {"type": "null"}]}}},
        {"v": {"a": "x"}},
        {"v": {"a": "x", "c": 1}},
    ),
    (  # a oneOf whose branches a required constant tells apart (pydantic's discriminated union)
        {
            "type": "object",
            "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}},
            "$defs": {
                "Cat": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]},
                "Dog": {"type": "object", "properties": {"kind": {"enum": ["dog"]}}, "required": ["kind"]},
            },
        },
        {"pet": {"kind": "dog"}},
        {"pet": {"kind": "dog", "bark": "woof"}},
    ),
    (  # any other oneOf: closed branches could each match what both matched (and oneOf refused)
        {"type": "object", "oneOf": [{"properties": {"a": _STR}}, {"properties": {"b": _STR}}]},
        {"a": 1, "b": "x"},  # matches only the second branch
        None,
    ),
    (  # a definition referenced alone is closed, also through recursion to the root
        {
            "type": "object",
            "properties": {"kid": {"$ref": "#/$defs/Base", "description": "d"}, "more": {"$ref": "#"}},
            "$defs": {"Base": _BASE},
        },
        {"kid": {"a": "x"}, "more": {"kid": {"a": "y"}}},
        {"kid": {"a": "x"}, "more": {"kid": {"a": "y", "c": 1}}},
    ),
]


@pytest.mark.parametrize(("schema", "valid", "refused"), _CLOSING_CASES)
def test_closing_objects_never_refuses_what_the_schema_needs(
    schema: dict[str, Any], valid: dict[str, Any], refused: dict[str, Any] | None
) -> None:
    closed = closed_objects(schema)
    jsonschema.Draft202012Validator.check_schema(closed)
    jsonschema.validate(valid, schema)
    jsonschema.validate(valid, closed)
    if refused is not None:
        jsonschema.validate(refused, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(refused, closed)
    # The grammar engine compiles it (an unsatisfiable schema would be refused here) whenever it
    # compiles the schema as given (llguidance refuses a oneOf it cannot prove exclusive).
    try:
        validate_structured_outputs(StructuredOutputsParams(json=schema))
    except ValueError:
        return
    validate_structured_outputs(StructuredOutputsParams(json=closed))
    function = FunctionTool.model_validate(
        {"type": "function", "function": {"name": "f", "parameters": schema}}
    ).function
    validate_structured_outputs(
        StructuredOutputsParams(json=required_calls_schema([function], parallel=True))
    )


def test_functions_without_parameters_do_not_share_a_schema() -> None:
    [a, b] = _functions(NO_ARGS, {"type": "function", "function": {"name": "other"}})
    first = parameters_of(a)
    first["properties"]["x"] = {"type": "integer"}
    first["additionalProperties"] = True
    assert parameters_of(b) == {"type": "object", "properties": {}, "additionalProperties": False}
    assert named_call_schema(a) == parameters_of(b)


REQUIRED_OUTPUT = (
    '[{"name": "search", "arguments": {"query": "a \\"}]\\" b", "filters": [{"site": "x"}]}}, '
    '{"name":"get_time","arguments":{}}]'
)


@pytest.mark.parametrize("piece", [1, 2, 7, 1000])
def test_required_stream_passes_arguments_on_as_written(piece: int) -> None:
    ids = iter(["call_a", "call_b"])
    stream = RequiredCallsStream(lambda: next(ids))
    text = REQUIRED_OUTPUT
    deltas = [stream.feed(text[i : i + piece]) for i in range(0, len(text), piece)] + [stream.finish()]
    parsed = assemble(deltas)
    assert parsed.content is None
    assert [(c.id, c.name) for c in parsed.tool_calls] == [("call_a", "search"), ("call_b", "get_time")]
    assert json.loads(parsed.tool_calls[0].arguments) == {"query": 'a "}]" b', "filters": [{"site": "x"}]}
    assert parsed.tool_calls[0].arguments == text[text.index('{"query"') : text.index("}}, ") + 1]
    assert parsed.tool_calls[1].arguments == "{}"
    if piece == 1:  # one piece per character once the name is known: nothing waits for the end
        first = [p for d in deltas for p in d.tool_calls if p.index == 0]
        assert first[0].name == "search" and len(first) == 1 + len(parsed.tool_calls[0].arguments)


def test_required_stream_edge_cases() -> None:
    # Arguments before the name (not our schema's order) wait for the name, then come out whole.
    stream = RequiredCallsStream(lambda: "call_x")
    parsed = assemble([stream.feed('[{"arguments": {"a": [1, "]"]}, "name": "f"}]'), stream.finish()])
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"a": [1, "]"]}')]
    # Cut off by max_tokens: the call so far, as written.
    stream = RequiredCallsStream(lambda: "call_y")
    parsed = assemble([stream.feed('[{"name": "f", "arguments": {"a": "xy'), stream.finish()])
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"a": "xy')]


def test_named_stream_is_the_arguments() -> None:
    stream = NamedCallStream("get_time", "call_1")
    first = stream.feed("")
    assert [(p.id, p.name, p.arguments) for p in first.tool_calls] == [("call_1", "get_time", "")]
    parts = [stream.feed(c) for c in ' {"tz": "}"}  \n'] + [stream.finish()]
    assert "".join(p.arguments for d in parts for p in d.tool_calls) == '{"tz": "}"}'


def test_parallel_false_keeps_the_first_auto_call() -> None:
    body = ChatCompletionRequest.model_validate(
        {"messages": CONVERSATION, "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False}
    )
    plan = plan_tools(body, ServerSettings(enable_auto_tool_choice=True, tool_call_parser="hermes"))
    stream = plan.new_stream()
    text = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
    parsed = assemble([stream.feed(text), stream.finish()])
    assert [c.name for c in parsed.tool_calls] == ["a"] and parsed.content is None


# -- the server ---------------------------------------------------------------------------------


def _args(call: Any) -> dict[str, Any]:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def test_history_with_tool_calls_is_accepted_and_rendered(client: openai.OpenAI, model_dir: Path) -> None:
    out = client.chat.completions.create(
        model=MODEL,
        messages=CONVERSATION,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=3,  # type: ignore[arg-type]
    )
    expected = Tokenizer.from_dir(model_dir).encode(
        _expected_prompt(model_dir, TOOLS), add_special_tokens=False
    )
    assert out.usage is not None and out.usage.prompt_tokens == len(expected)
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_named_function_is_a_valid_call(client: openai.OpenAI, stream: bool) -> None:
    choice = {"type": "function", "function": {"name": "search"}}
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "find quire"}],
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=200,
        temperature=1.0,
        n=3,
        seed=5,
    )
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        choices = _assemble_raw(chunks)
    else:
        choices = client.chat.completions.create(**kwargs).choices
    assert len(choices) == 3
    for c in choices:
        assert c.finish_reason == "tool_calls"
        assert c.message.content is None
        [call] = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "search"
        _args(call)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gives_valid_calls_streamed_and_not(client: openai.OpenAI, parallel: bool) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "do something"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=parallel,
        max_tokens=300,
        temperature=1.0,
        seed=11,
        n=4,
    )
    plain = client.chat.completions.create(**kwargs).choices
    streamed = _assemble_raw(list(client.chat.completions.create(stream=True, **kwargs)))
    for choices in (plain, streamed):
        for c in choices:
            assert c.finish_reason == "tool_calls", c
            assert c.message.content is None
            calls = c.message.tool_calls
            assert calls and (parallel or len(calls) == 1)
            for call in calls:
                _args(call)
            assert len({call.id for call in calls}) == len(calls)
    # Same seed, same tokens: the stream assembles into exactly the non-streamed calls.
    for a, b in zip(plain, streamed, strict=True):
        assert [(t.function.name, t.function.arguments) for t in a.message.tool_calls] == [
            (t.function.name, t.function.arguments) for t in b.message.tool_calls
        ]


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_sdk_stream_helper_assembles_calls(client: openai.OpenAI, choice: Any) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "weather?"}],
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=300,
        seed=3,
    )
    with client.chat.completions.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert calls and final.choices[0].finish_reason == "tool_calls"
    for call in calls:
        _args(call)
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.name, e.arguments) for e in done] == [(c.function.name, c.function.arguments) for c in calls]
    # Arguments came out as the model wrote them, in several pieces, not all at the end.
    deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta" and e.index == 0]
    assert len(deltas) > 2 and "".join(d.arguments_delta for d in deltas) == calls[0].function.arguments
    # The same seed without streaming: the same calls.
    plain = client.chat.completions.create(**kwargs).choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in plain] == [
        (c.function.name, c.function.arguments) for c in calls
    ]


class Lookup(BaseModel):
    """Look a word up."""

    word: str = Field(max_length=10)
    language: Literal["en", "fr", "de"]


def test_sdk_parse_with_a_strict_pydantic_tool(client: openai.OpenAI) -> None:
    # The SDK's own helper for agent code: strict function tools parsed back into the model type.
    out = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "define 'quire'"}],
        tools=[openai.pydantic_function_tool(Lookup)],
        tool_choice={"type": "function", "function": {"name": "Lookup"}},
        max_tokens=100,
    )
    [call] = out.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, Lookup)


def test_answers_with_calls_go_back_into_messages(client: openai.OpenAI, server: ServerProcess) -> None:
    # The agent loop as the SDK documents it: append the answer's message, then one tool message per
    # call. The plain answer, the .stream() helper's (tool calls with "index", arguments with
    # "parsed_arguments", annotations/audio/function_call/parsed null) and .parse()'s must all be
    # accepted and render exactly as the calls written out by hand.
    messages: list[Any] = [{"role": "user", "content": "weather?"}]
    kwargs: dict[str, Any] = dict(model=MODEL, tools=TOOLS, max_tokens=200, seed=4)
    plain = (
        client.chat.completions.create(messages=messages, tool_choice="required", **kwargs).choices[0].message
    )
    with client.chat.completions.stream(
        messages=messages, tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kwargs
    ) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0].message
    parsed = (
        client.chat.completions.parse(
            model=MODEL,
            messages=messages,
            tools=[openai.pydantic_function_tool(Lookup)],
            tool_choice={"type": "function", "function": {"name": "Lookup"}},
            max_tokens=100,
        )
        .choices[0]
        .message
    )
    by_hand: list[dict[str, Any]] = list(messages)
    for answer in (plain, streamed, parsed):
        assert answer.tool_calls
        messages.append(answer)
        by_hand.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": c.function.arguments},
                    }
                    for c in answer.tool_calls
                ],
            }
        )
        for call in answer.tool_calls:
            result = {"role": "tool", "tool_call_id": call.id, "content": '{"ok": true}'}
            messages.append(result)
            by_hand.append(result)
    sent = streamed.model_dump(exclude_unset=True, mode="json")
    assert "index" in sent["tool_calls"][0] and "parsed_arguments" in sent["tool_calls"][0]["function"]
    assert (
        "parsed_arguments" in parsed.model_dump(exclude_unset=True, mode="json")["tool_calls"][0]["function"]
    )
    answer = client.chat.completions.create(
        messages=messages, tool_choice="none", **{**kwargs, "max_tokens": 1}
    )
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": by_hand, "tool_choice": "none", **kwargs, "max_tokens": 1},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert (
        answer.usage is not None and answer.usage.prompt_tokens == response.json()["usage"]["prompt_tokens"]
    )


def test_stream_chunk_sequence_is_openais(server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "stream": True,
        "max_tokens": 200,
        "seed": 1,
        "logprobs": True,
        "top_logprobs": 2,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [
            json.loads(line[6:])
            for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    pieces = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    first = pieces[0]
    assert set(first) == {"index", "id", "type", "function"} and first["function"]["arguments"] == ""
    assert first["type"] == "function" and first["function"]["name"] in SCHEMAS
    assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in pieces[1:2])
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(d.get("content") for d in deltas[1:])
    # Every token's logprobs arrive, also those of text still held back when they were sampled.
    entries = [
        t
        for e in events
        if e["choices"] and e["choices"][0]["logprobs"]
        for t in e["choices"][0]["logprobs"]["content"]
    ]
    assert len(entries) == events[-1]["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 2 for t in entries)


def test_auto_parses_a_hermes_call(client: openai.OpenAI) -> None:
    # The regex makes the random model print text and then a call in the hermes format; the
    # server's parser must turn the markup into a call and leave only the text as content.
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "(Paris|Rome)", "unit": "celsius"}}\n</tool_call>'
    regex = "Let me check\\.\n" + call_text.replace("{", "\\{").replace("}", "\\}")
    for stream in (False, True):
        kwargs: dict[str, Any] = dict(
            model=MODEL,
            messages=[{"role": "user", "content": "weather in Paris?"}],
            tools=TOOLS,
            max_tokens=100,
            extra_body={"structured_outputs": {"regex": regex}},
        )
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert "<tool_call>" not in text and "{" not in text
            [choice] = _assemble_raw(chunks)
        else:
            [choice] = client.chat.completions.create(**kwargs).choices
        assert choice.message.content == "Let me check."
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and _args(call)["city"] in ("Paris", "Rome")
        assert choice.finish_reason == "tool_calls"


# -- refusals ------------------------------------------------------------------------------------


def _deep(levels: int) -> dict[str, Any]:
    """An arguments schema of objects nested ``levels`` deep."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _post(server: ServerProcess, body: dict[str, Any]) -> httpx.Response:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(f"{server.url}/v1/chat/completions", json={**base, **body}, timeout=30)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "properties": 3}},
                    }
                ]
            },
            "not a valid JSON schema",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            '"type": "object"',
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": _deep(300)}}]},
            "levels deep",
        ),
        ({"tools": [NO_ARGS, NO_ARGS], "tool_choice": "required"}, "more than once"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not among the tools",
        ),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "cannot both shape",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
                    }
                ]
            },
            "images are not supported by this server",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
                    }
                ]
            },
            "audio is not supported",
        ),
        ({"messages": [{"role": "tool", "content": "42"}]}, "tool_call_id"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "x",
                        "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}],
                    }
                ]
            },
            "only assistant messages carry tool_calls",
        ),
    ],
)
def test_bad_tool_requests_are_400s(server: ServerProcess, body: dict[str, Any], message: str) -> None:
    response = _post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] or message == error.get("param"), error
    assert "matches none of the accepted types" not in error["message"]  # says why, not a type error


def test_auto_needs_the_servers_flags() -> None:
    # No tool_choice with tools means "auto", as in OpenAI's and vLLM's API.
    body = ChatCompletionRequest.model_validate({"messages": CONVERSATION, "tools": TOOLS})
    for settings in (ServerSettings(), ServerSettings(tool_call_parser="hermes")):
        with pytest.raises(APIError) as refused:
            plan_tools(body, settings)
        assert refused.value.status == 400
        assert "--enable-auto-tool-choice" in refused.value.message
    assert "lacks --enable-auto-tool-choice and --tool-call-parser NAME" in str(
        _refusal(body, ServerSettings())
    )
    plan = plan_tools(body, ServerSettings(enable_auto_tool_choice=True, tool_call_parser="mistral"))
    assert plan.mode == "auto" and plan.parser is not None and plan.parser.name == "mistral"
    # Mistral's markers are special tokens: the output keeps them for the parser to see.
    assert not plan.apply(SamplingParams()).skip_special_tokens
    # Enforced choices need no flag; "none" neither.
    for choice in ("required", "none", {"type": "function", "function": {"name": "get_time"}}):
        body = ChatCompletionRequest.model_validate(
            {"messages": CONVERSATION, "tools": TOOLS, "tool_choice": choice}
        )
        assert plan_tools(body, ServerSettings()).template_tools == TOOLS
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        ServerSettings(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="unknown tool-call parser 'qwen'"):
        ServerSettings(tool_call_parser="qwen")


def test_hermes_tags_that_are_special_tokens_reach_the_parser(model_dir: Path) -> None:
    # Hermes 2 Pro and Hermes 3 make <tool_call> and </tool_call> special tokens. The output of an
    # "auto" request is detokenized as the plan says; with the tags skipped, the call's JSON would
    # reach the client as content.
    backend = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True) for t in ("<tool_call>", "</tool_call>")]
    )
    tokenizer = Tokenizer(backend, special_tokens={"eos_token": "<|im_end|>"})
    output = 'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    ids = tokenizer.encode(output, add_special_tokens=False)
    assert {tokenizer.token_to_id("<tool_call>"), tokenizer.token_to_id("</tool_call>")} <= set(ids)
    body = ChatCompletionRequest.model_validate({"messages": CONVERSATION, "tools": TOOLS})
    plan = plan_tools(body, ServerSettings(enable_auto_tool_choice=True, tool_call_parser="hermes"))
    params = plan.apply(SamplingParams())
    detokenizer = IncrementalDetokenizer(tokenizer, [], params.skip_special_tokens)
    text = "".join(detokenizer.add_tokens([i]) for i in ids) + detokenizer.finish()
    assert text == output
    stream = plan.new_stream()
    parsed = assemble([stream.feed(text), stream.finish()])
    assert parsed.content == "Sure." and [c.name for c in parsed.tool_calls] == ["get_time"]


def _refusal(body: ChatCompletionRequest, settings: ServerSettings) -> str:
    try:
        plan_tools(body, settings)
    except APIError as exc:
        return exc.message
    raise AssertionError("not refused")


def test_text_content_parts_are_accepted(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
        max_tokens=2,
    )
    assert out.choices[0].message.content is not None


# -- helpers ---------------------------------------------------------------------------------------


class _Call:
    def __init__(self) -> None:
        self.id = ""
        self.type = ""
        self.function = type("F", (), {"name": "", "arguments": ""})()


class _Message:
    def __init__(self) -> None:
        self.content: str | None = None
        self.tool_calls: list[_Call] | None = None


class _Choice:
    def __init__(self) -> None:
        self.message = _Message()
        self.finish_reason: str | None = None


def _assemble_raw(chunks: list[Any]) -> list[_Choice]:
    """Streamed chunks joined per choice index the way OpenAI documents it (by tool-call index)."""
    choices: dict[int, _Choice] = {}
    for chunk in chunks:
        for c in chunk.choices:
            choice = choices.setdefault(c.index, _Choice())
            if c.delta.content:
                choice.message.content = (choice.message.content or "") + c.delta.content
            for piece in c.delta.tool_calls or []:
                calls = choice.message.tool_calls = choice.message.tool_calls or []
                while len(calls) <= piece.index:
                    calls.append(_Call())
                call = calls[piece.index]
                call.id = piece.id or call.id
                call.type = piece.type or call.type
                if piece.function is not None:
                    call.function.name = piece.function.name or call.function.name
                    call.function.arguments += piece.function.arguments or ""
            if c.finish_reason:
                choice.finish_reason = c.finish_reason
    return [choices[i] for i in sorted(choices)]
