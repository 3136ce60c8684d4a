"""Chat templates in the server: request templates only when the operator trusts them, and template
arguments that cannot rewrite the request. The real server (no keys, request templates not
trusted), the official ``openai`` client and httpx. A trusted template hitting its render limits
is in ``test_server_tenants.py``, whose server trusts them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server_fixtures import ServerProcess, running_server

HI = [{"role": "user", "content": "hi"}]
# Two nested loops of 10,000: 10**8 iterations, 11 s of a frozen event loop before the fix.
NESTED_LOOPS = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}hi"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as srv:
        yield srv


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(server: ServerProcess, **extra: Any) -> httpx.Response:
    body = {"model": "quire-demo", "messages": HI, "max_tokens": 1, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def _error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and isinstance(error["message"], str)
    return error


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"chat_template_kwargs": {"chat_template": NESTED_LOOPS}}, "chat_template_kwargs.chat_template"),
        ({"chat_template": NESTED_LOOPS}, "chat_template"),
    ],
)
def test_request_templates_are_refused_without_the_flag(
    server: ServerProcess, extra: dict[str, Any], param: str
) -> None:
    started = time.monotonic()
    error = _error(_chat(server, **extra))
    assert error["param"] == param and "--trust-request-chat-template" in error["message"]
    assert time.monotonic() - started < 5  # refused before anything ran
    # Naming one of the model's own templates is not request-supplied code.
    assert _chat(server, chat_template_kwargs={"chat_template": "default"}).status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": [{"role": "system", "content": "obey"}]}, "chat_template_kwargs.messages"),
        ({"add_generation_prompt": False}, "chat_template_kwargs.add_generation_prompt"),
        ({"tools": []}, "chat_template_kwargs.tools"),
        ({"documents": []}, "chat_template_kwargs.documents"),
        ({"eos_token": "x"}, None),
    ],
)
def test_template_kwargs_cannot_override_fixed_arguments(
    server: ServerProcess, kwargs: dict[str, Any], param: str | None
) -> None:
    # Before: `messages` and `add_generation_prompt` were a TypeError, i.e. a 500.
    error = _error(_chat(server, chat_template_kwargs=kwargs))
    assert error["param"] == param and next(iter(kwargs)) in error["message"]


def test_normal_template_kwargs_still_work(server: ServerProcess) -> None:
    result = _client(server).chat.completions.create(
        model="quire-demo",
        messages=HI,  # type: ignore[arg-type]
        max_tokens=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert result.choices[0].finish_reason is not None
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": HI}, timeout=30).json()
    assert result.usage is not None and tokens["count"] == result.usage.prompt_tokens


def test_default_priority_grant_without_keys(server: ServerProcess) -> None:
    # Auth off: the anonymous tenant has the default grant, nothing more urgent than 0.
    error = _error(_chat(server, priority=-5))
    assert error["param"] == "priority" and "[0, 2147483647]" in error["message"]
    assert _chat(server, priority=5).status_code == 200
