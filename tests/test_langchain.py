"""LangChain's ``ChatOpenAI`` against a real ``quire serve``: structured output and forced tool
calls, the two things agent and extraction code built on LangChain asks of a server.

A tiny random-weight model answers at temperature 1.0 (seeded, so a failure reproduces), so every
parsed result below is valid only because quire's grammar engine enforces the schema LangChain
sent. LangChain's tracing is switched off for the module: nothing here may leave the machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from server_fixtures import ServerProcess, running_server

langchain_openai = pytest.importorskip("langchain_openai")

MODEL = "tiny"


class Weather(BaseModel):
    """Weather report for a city."""

    city: str = Field(max_length=12, description="the city")
    unit: Literal["celsius", "fahrenheit"]
    days: int = Field(ge=1, le=7)


class GetTime(BaseModel):
    """The current time in a time zone."""

    tz: Literal["UTC", "CET", "PST"]


TOOLS = {"Weather": Weather, "GetTime": GetTime}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Any) -> Iterator[ServerProcess]:
    model_dir: Path = tiny_model_dir("qwen2")
    args = ("--served-model-name", MODEL, "--max-model-len", "2048", "--kv-cache-memory", "64MiB")
    with pytest.MonkeyPatch.context() as env, running_server(str(model_dir), *args) as proc:
        env.setenv("LANGSMITH_TRACING", "false")
        env.setenv("LANGCHAIN_TRACING_V2", "false")
        yield proc


@pytest.fixture(scope="module")
def chat(server: ServerProcess) -> Any:
    return langchain_openai.ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        model=MODEL,
        temperature=1.0,
        max_tokens=120,
        max_retries=0,
        seed=7,
    )


@pytest.mark.parametrize("method", [None, "json_schema", "function_calling"])
def test_with_structured_output(chat: Any, method: str | None) -> None:
    # None: ChatOpenAI's default (json_schema: response_format carrying the model's schema);
    # function_calling: a tool call forced by name, its arguments parsed into the model.
    kwargs = {} if method is None else {"method": method}
    extractor = chat.with_structured_output(Weather, **kwargs)
    result = extractor.invoke("What is the weather in Paris for the next three days?")
    assert isinstance(result, Weather)
    assert 1 <= result.days <= 7 and len(result.city) <= 12


def test_with_structured_output_json_mode(server: ServerProcess, chat: Any) -> None:
    # json_mode asks for any JSON object (response_format json_object), so only a schema-less
    # parse applies: a pydantic model's fields are not in the ask. Random weights never close an
    # open-ended object by chance; pushing up '"' and '}' lets them, and without the grammar the
    # push alone would write '""""...', not JSON.
    bias = {_token_id(server, '"'): 10, _token_id(server, "}"): 5}
    data = chat.bind(max_tokens=64, logit_bias=bias).with_structured_output(None, method="json_mode")
    assert isinstance(data.invoke("Give me JSON."), dict)


def test_bind_tools_with_a_forced_call(chat: Any) -> None:
    model = chat.bind_tools([Weather, GetTime], tool_choice="GetTime")
    message = model.invoke("What time is it in Berlin?")
    [call] = message.tool_calls
    assert call["name"] == "GetTime" and call["id"]
    GetTime.model_validate(call["args"])
    # Streamed: LangChain joins the tool-call chunks into the same kind of call.
    chunks = list(model.stream("And now?"))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    [streamed] = joined.tool_calls
    assert streamed["name"] == "GetTime"
    GetTime.model_validate(streamed["args"])


@pytest.mark.parametrize("choice", ["required", "any"])  # "any" is LangChain's word for "required"
def test_bind_tools_required(chat: Any, choice: str) -> None:
    message = chat.bind_tools([Weather, GetTime], tool_choice=choice).invoke("Weather in Rome, and the time?")
    assert message.tool_calls and not message.invalid_tool_calls
    for call in message.tool_calls:
        TOOLS[call["name"]].model_validate(call["args"])


def test_tool_results_go_back_as_history(chat: Any) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage

    question = HumanMessage("Weather in Rome, and the time?")
    first = chat.bind_tools([Weather, GetTime], tool_choice="required").invoke([question])
    assert first.tool_calls
    # The calls and their results go back as history; quire renders them and answers in text.
    results = [ToolMessage(content='{"ok": true}', tool_call_id=call["id"]) for call in first.tool_calls]
    answer = chat.bind_tools([Weather, GetTime], tool_choice="none").invoke([question, first, *results])
    assert isinstance(answer.content, str) and not answer.tool_calls


def _token_id(server: ServerProcess, text: str) -> int:
    response = httpx.post(
        f"{server.url}/tokenize",
        json={"model": MODEL, "prompt": text, "add_special_tokens": False},
        timeout=30,
    )
    [token] = response.json()["tokens"]
    return token
