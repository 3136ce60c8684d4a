"""Structured output through the API: OpenAI's ``response_format``, vLLM's ``structured_outputs``
and ``guided_*`` fields, against a real ``quire serve`` on the random-weight demo model, with the
official ``openai`` client (LangChain's ``ChatOpenAI``: ``test_langchain.py``).

Random weights know nothing about JSON, so every valid output here is the grammar's doing. Requests
are seeded so that a failure reproduces; sampling runs at temperature 1.0 over the full vocabulary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from server_fixtures import ServerProcess, running_server

MODEL = "quire-demo"
HI = [{"role": "user", "content": "Describe a person."}]

# Nested objects, an array of enums, required fields, string patterns and bounded integers: every
# branch of it ends within a few dozen tokens, so each sample must finish with "stop".
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "kind": {"type": "string", "enum": ["cat", "dog"]},
        "owner": {
            "type": "object",
            "properties": {
                "active": {"type": "boolean"},
                "code": {"type": "string", "pattern": "^[0-9]{3}-[a-z]{2}$"},
            },
            "required": ["active", "code"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "name", "kind", "owner"],
    "additionalProperties": False,
}


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=8)
    zip_code: str = pydantic.Field(pattern=r"^[0-9]{5}$")


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    role: Literal["admin", "user"]
    address: Address  # a nested model: $defs / $ref in the schema the SDK sends


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _post(server: ServerProcess, path: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json={"model": MODEL, **body}, timeout=120)


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


def test_sdk_parse_returns_the_pydantic_object(client: openai.OpenAI) -> None:
    schema = openai.lib._pydantic.to_strict_json_schema(Person)
    assert "$defs" in schema and schema["additionalProperties"] is False  # what the SDK sends
    for seed in (1, 2):
        completion = client.chat.completions.parse(
            model=MODEL, messages=HI, response_format=Person, temperature=1.0, seed=seed, max_tokens=200
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)
        assert re.fullmatch(r"[0-9]{5}", choice.message.parsed.address.zip_code)


def test_json_object_is_parseable_json(server: ServerProcess, client: openai.OpenAI) -> None:
    # Random weights never close an open-ended object by chance; pushing up '"' (most) and '}'
    # lets them finish. Without the grammar that push alone would write '""""...', not JSON.
    bias = {str(_token_id(server, '"')): 10.0, str(_token_id(server, "}")): 5.0}
    completion = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        response_format={"type": "json_object"},
        n=8,
        temperature=1.0,
        seed=3,
        max_tokens=64,
        logit_bias=bias,
    )
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content or ""), dict)


def test_json_schema_validates_in_all_50_samples(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True},
        },
        n=50,
        temperature=1.0,
        seed=4,
        max_tokens=160,
    )
    assert len(completion.choices) == 50
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    # Not one constant answer: the grammar constrains, the sampler still samples.
    assert len({choice.message.content for choice in completion.choices}) > 10


def test_streamed_constrained_output_validates(client: openai.OpenAI) -> None:
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HI,
        extra_body={"structured_outputs": {"json": SCHEMA}},
        n=6,
        temperature=1.0,
        seed=5,
        max_tokens=160,
        stream=True,
    )
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert sorted(texts) == list(range(6))
    for index, text in texts.items():
        assert finish[index] == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)

    # The SDK's stream helper assembles and parses the streamed object.
    with client.chat.completions.stream(
        model=MODEL, messages=HI, response_format=Person, temperature=1.0, seed=6, max_tokens=200
    ) as helper:
        final = helper.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


GBNF = 'root ::= "(" [0-9]{1,3} ("+" [0-9]{1,3}){0,2} ")"'
LARK = 'start: "[" num ("," num)~0..2 "]"\nnum: /[0-9]{1,3}/'


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"guided_regex": r"[a-z]{2,6}-[0-9]{1,3}"}, r"[a-z]{2,6}-[0-9]{1,3}"),
        ({"structured_outputs": {"regex": r"(yes|no), [A-Z]{3}"}}, r"(yes|no), [A-Z]{3}"),
        ({"guided_choice": ["red pill", "blue pill", "none"]}, r"red pill|blue pill|none"),
        ({"structured_outputs": {"choice": ["α", "β γ"]}}, r"α|β γ"),
        ({"guided_grammar": GBNF}, r"\([0-9]{1,3}(\+[0-9]{1,3}){0,2}\)"),
        ({"structured_outputs": {"grammar": LARK}}, r"\[[0-9]{1,3}(,[0-9]{1,3}){0,2}\]"),
    ],
    ids=["guided_regex", "regex", "guided_choice", "choice", "ebnf", "lark"],
)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_regex_choice_and_grammar_outputs_match(
    client: openai.OpenAI, extra: dict[str, Any], pattern: str, endpoint: str
) -> None:
    common: dict[str, Any] = {"n": 12, "temperature": 1.0, "seed": 7, "max_tokens": 40, "extra_body": extra}
    if endpoint == "chat":
        completion = client.chat.completions.create(model=MODEL, messages=HI, **common)
        outputs = [(c.message.content or "", c.finish_reason) for c in completion.choices]
    else:
        result = client.completions.create(model=MODEL, prompt="The answer:", **common)
        outputs = [(c.text, c.finish_reason) for c in result.choices]
    assert len(outputs) == 12
    for text, finish_reason in outputs:
        assert finish_reason == "stop" and re.fullmatch(pattern, text), (text, finish_reason)


def test_cut_by_max_tokens_says_length(server: ServerProcess) -> None:
    response = _post(server, "completions", prompt="x", max_tokens=3, guided_json=SCHEMA, seed=8)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"].startswith("{")


def test_text_response_format_is_unconstrained(server: ServerProcess) -> None:
    response = _post(server, "chat/completions", messages=HI, max_tokens=2, response_format={"type": "text"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
         "response_format", "nonsense"),
        ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/bogus"}}}},
         "guided_json", "bogus"),
        ({"structured_outputs": {"json": {"type": "object", "required": 3}}}, "structured_outputs.json", "required"),
        ({"guided_regex": "[a-z"}, "guided_regex", "regex"),
        ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex", "regex"),
        ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs.grammar", "foo"),
        ({"guided_grammar": 'root ::= "a" missing'}, "guided_grammar", "missing"),
    ],
    ids=["schema-type", "schema-dangling-ref", "so-schema", "regex", "so-regex", "lark", "ebnf"],
)  # fmt: skip
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_invalid_constraints_are_400s_with_the_engine_message(
    server: ServerProcess, extra: dict[str, Any], param: str, words: str, endpoint: str
) -> None:
    prompt = {"messages": HI} if endpoint == "chat/completions" else {"prompt": "x"}
    for _ in range(2):  # the second time from the remembered verdict, with the same answer
        error = _error(_post(server, endpoint, max_tokens=4, **prompt, **extra))
        assert "invalid" in error["message"].lower() and words in error["message"], error
        assert error["param"] == param, error
    # The engine is still fine afterwards.
    assert _post(server, "completions", prompt="x", max_tokens=1).status_code == 200


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}},
         ("response_format", "guided_json")),
        ({"guided_regex": "a", "guided_choice": ["a"]}, ("guided_regex", "guided_choice")),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         ("response_format", "structured_outputs")),
    ],
)  # fmt: skip
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_two_ways_of_asking_are_refused(
    server: ServerProcess, extra: dict[str, Any], names: tuple[str, str], endpoint: str
) -> None:
    prompt = {"messages": HI} if endpoint == "chat/completions" else {"prompt": "x"}
    error = _error(_post(server, endpoint, max_tokens=4, **prompt, **extra))
    assert all(name in error["message"] for name in names) and error["param"] in names


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
         "response_format.json_schema.name", "pattern"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern",
         "disable_any_whitespace"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_json": "[1, 2]"}, "guided_json", "object"),
        ({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "llguidance"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "disable_any_whitespace"),
    ],
)  # fmt: skip
def test_malformed_asks_are_400s_naming_the_field(
    server: ServerProcess, extra: dict[str, Any], param: str, words: str
) -> None:
    error = _error(_post(server, "chat/completions", messages=HI, max_tokens=4, **extra))
    assert error["param"] == param and words in error["message"], error


def test_accepted_extras(server: ServerProcess) -> None:
    # guided_decoding_backend naming quire's engine, vLLM's no-op disable_fallback, compact JSON.
    response = _post(
        server,
        "completions",
        prompt="x",
        max_tokens=40,
        seed=9,
        structured_outputs={"choice": ["ok", "fine"], "disable_fallback": True},
    )
    assert response.status_code == 200 and response.json()["choices"][0]["text"] in ("ok", "fine")
    response = _post(
        server, "completions", prompt="x", max_tokens=40, guided_choice=["ok"], guided_decoding_backend="auto"
    )
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "ok"
    response = _post(
        server,
        "completions",
        prompt="x",
        max_tokens=80,
        seed=10,
        n=4,
        structured_outputs={"json": SCHEMA, "disable_any_whitespace": True},
    )
    assert response.status_code == 200
    for choice in response.json()["choices"]:
        assert choice["finish_reason"] == "stop" and not re.search(r"\s", choice["text"])
        jsonschema.validate(json.loads(choice["text"]), SCHEMA)


def _token_id(server: ServerProcess, text: str) -> int:
    response = httpx.post(
        f"{server.url}/tokenize",
        json={"model": MODEL, "prompt": text, "add_special_tokens": False},
        timeout=30,
    )
    tokens = response.json()["tokens"]
    assert len(tokens) == 1, (text, tokens)
    return tokens[0]
