"""Fuzzing the real server: hypothesis builds request bodies for ``/v1/completions`` and
``/v1/chat/completions`` from the fields of the request models, mixing sensible values with
extreme ones (integers past 64 bits, 1e308, NaN and infinities, lone surrogates, deep nesting,
wrong types, long strings), and sends them with an API key to one real ``quire serve``.

Every response must be below 500; every error body must be OpenAI's
``{"error": {"message", "type", "param", "code"}}``; a stream must end with ``[DONE]`` and carry no
server-side error event; and afterwards the server must still answer a normal request. The number
of examples is bounded (``QUIRE_FUZZ_EXAMPLES``, default 150 per endpoint) and the generation is
derandomized, so the default suite stays fast and repeatable; raise the count and set
``QUIRE_FUZZ_SEED`` for a longer, different search. With ``QUIRE_FUZZ_FINDINGS=FILE`` each distinct
failure is appended to FILE (body, status, response excerpt) as soon as it is seen.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st

from server_fixtures import ServerProcess, running_server

API_KEY = "sk-fuzz-0123456789abcdef"
MODEL = "quire-demo"
EXAMPLES = int(os.environ.get("QUIRE_FUZZ_EXAMPLES", "150"))
FUZZ_SEED = int(os.environ.get("QUIRE_FUZZ_SEED", "0"))
FINDINGS = os.environ.get("QUIRE_FUZZ_FINDINGS")
# A request that takes longer than this is a hang: every valid body asks for a few tokens only.
REQUEST_TIMEOUT_S = 60.0
BUSY_GAUGES = ("quire:num_requests_running", "quire:num_requests_waiting", "quire:kv_cache_usage_perc")


# --- strategies ---

BIG_INTS = [
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    2**64 + 1,
    -(2**63) - 1,
    -(2**64),
    10**30,
    10**400,
]
EXTREME_FLOATS = [
    1e308, -1e308, 1.7976931348623157e308, 5e-324, 1e-50, -1e-50, 1e39, -1e39, 1e-320,
    -0.0, math.nan, math.inf, -math.inf, 3.4028235e38, 3.5e38, 1e-45,
]  # fmt: skip
NASTY_STRINGS = [
    "", " ", "\ud800", "a\udfffb", "\x00", "\u202e\ufeff", "🦊" * 50, "x" * 20_000, "NaN", "Infinity",
    "1e308", "-1", "null", "{{ 7 * 7 }}", "{% for i in range(10) %}x{% endfor %}", "<|im_end|>",
    "\\u0000", "é\u0301", "\U0010ffff",
]  # fmt: skip


class Deep(str):
    """A value nested ``depth`` levels deep, as text spliced into the JSON body at send time:
    as a Python object it would overflow the recursion of json.dumps and of hypothesis' printer."""

    def __new__(cls, depth: int) -> Deep:
        return super().__new__(cls, f"__deep_{depth}__")

    @staticmethod
    def splice(text: str) -> str:
        def nested(match: re.Match[str]) -> str:
            depth = int(match.group(1))
            return '{"a":[' * (depth // 2) + "1" + "]}" * (depth // 2)

        return re.sub(r'"__deep_(\d+)__"', nested, text)


def nasty() -> st.SearchStrategy[Any]:
    """Any JSON-ish value with a bias toward the edges: the wrong type for almost every field."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(BIG_INTS),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from(EXTREME_FLOATS),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(NASTY_STRINGS),
        st.text(max_size=40),
        st.sampled_from([[], {}, [[]], [None], {"": None}]),
        st.sampled_from([Deep(50), Deep(1_000), Deep(20_000)]),
        st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=6),
    )


# Values that pass a naive range check yet break float32 arithmetic (underflow to 0, overflow to
# inf) get a strategy of their own, so that they come up often, not once in a hundred draws.
FLOAT32_BREAKERS = [1e-50, 5e-324, 1e-45, 1e-39, 1e-300, 1e39, 1e300, 3.5e38, 1.7976931348623157e308]
NUMERIC_EDGES = st.one_of(
    st.sampled_from(FLOAT32_BREAKERS),
    st.sampled_from([*EXTREME_FLOATS, *BIG_INTS, 0, -1, 1, 0.0, 1.0000001, -1e-300]),
)


def floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=lo, max_value=hi, allow_nan=False)


def texts(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(min_size=min_size, max_size=max_size)


VOCAB = 2048  # the demo checkpoint's
TOKEN_ID = st.integers(min_value=0, max_value=VOCAB - 1)
BAD_TOKEN_ID = st.sampled_from([-1, VOCAB, 2**31 - 1, 2**31, 2**63, 2**64, 1.5])

# Values a client might well send: with these alone a request reaches the engine and generates.
# Few tokens per choice keeps each example fast: the point is the edges, not the generation.
SAMPLING_VALID: dict[str, st.SearchStrategy[Any]] = {
    "model": st.just(MODEL),
    "n": st.integers(min_value=1, max_value=3),
    "temperature": floats(0, 2),
    "top_p": floats(0.01, 1),
    "top_k": st.integers(min_value=0, max_value=50),
    "min_p": floats(0, 1),
    "presence_penalty": floats(-2, 2),
    "frequency_penalty": floats(-2, 2),
    "repetition_penalty": floats(0.5, 2),
    "logit_bias": st.dictionaries(TOKEN_ID.map(str), floats(-100, 100), max_size=4),
    "seed": st.integers(min_value=0, max_value=2**63 - 1),
    "priority": st.integers(min_value=0, max_value=10),
    "min_tokens": st.integers(min_value=0, max_value=2),
    "stop": st.one_of(texts(5, 1), st.lists(texts(5, 1), max_size=4)),
    "stop_token_ids": st.lists(TOKEN_ID, max_size=4),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": texts(10),
}
PROMPT_VALID = st.one_of(
    texts(30, 1),
    st.lists(texts(10, 1), min_size=1, max_size=2),
    st.lists(TOKEN_ID, min_size=1, max_size=8),
    st.lists(st.lists(TOKEN_ID, min_size=1, max_size=8), min_size=1, max_size=2),
)
MAX_TOKENS_VALID = st.integers(min_value=1, max_value=4)
COMPLETION_VALID = {
    **SAMPLING_VALID,
    "logprobs": st.integers(min_value=0, max_value=5),
    "echo": st.booleans(),
}
MESSAGE_VALID = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": st.one_of(
            texts(30),
            st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts(10)}), max_size=2),
        ),
    },
    optional={"name": texts(5, 1)},
)
CHAT_VALID = {
    **SAMPLING_VALID,
    "max_completion_tokens": MAX_TOKENS_VALID,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=5),
    "add_generation_prompt": st.booleans(),
    "chat_template_kwargs": st.fixed_dictionaries({}, optional={"enable_thinking": st.booleans()}),
}

# What replaces a field's value in an edge case: its type's extremes, then anything at all.
_NUMERIC = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "seed", "priority", "min_tokens", "max_tokens", "max_completion_tokens",
            "logprobs", "top_logprobs", "best_of")  # fmt: skip
SAMPLER_KNOBS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens", "seed", "priority")  # fmt: skip
_TOKEN_LISTS = st.one_of(
    st.lists(st.one_of(TOKEN_ID, BAD_TOKEN_ID), min_size=1, max_size=8),
    st.lists(st.lists(st.one_of(TOKEN_ID, BAD_TOKEN_ID), max_size=4), max_size=3),
    st.just([]),
    st.just([[]]),
)
_SPECIFIC_EDGES: dict[str, st.SearchStrategy[Any]] = {
    **{name: NUMERIC_EDGES for name in _NUMERIC},
    "prompt": st.one_of(
        st.sampled_from(NASTY_STRINGS), _TOKEN_LISTS, st.lists(st.sampled_from(NASTY_STRINGS))
    ),
    "stop": st.one_of(st.sampled_from(NASTY_STRINGS), st.lists(st.sampled_from(NASTY_STRINGS), max_size=5)),
    "stop_token_ids": _TOKEN_LISTS,
    "logit_bias": st.dictionaries(
        st.one_of(
            st.sampled_from(["-1", "2048", str(2**64), "1e3", "abc", "\ud800", " 5"]), TOKEN_ID.map(str)
        ),
        st.one_of(NUMERIC_EDGES, nasty()),
        min_size=1,
        max_size=3,
    ),
    "messages": st.one_of(
        st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.one_of(st.sampled_from(["user", "tool", "function", ""]), nasty()),
                    "content": nasty(),
                },
                optional={"name": nasty(), "tool_calls": nasty()},
            ),
            min_size=1,
            max_size=3,
        ),
        st.lists(MESSAGE_VALID, max_size=0),
        st.just([{"role": "user", "content": "x " * 100_000}]),
    ),
    "chat_template_kwargs": st.dictionaries(
        st.sampled_from(["messages", "add_generation_prompt", "chat_template", "tools", "bos_token", "x"]),
        nasty(),
        min_size=1,
        max_size=3,
    ),
    "suffix": st.one_of(texts(5, 1), nasty()),
    "tools": st.lists(st.dictionaries(texts(5), nasty(), max_size=2), min_size=1, max_size=2),
}


def _edge(name: str) -> st.SearchStrategy[Any]:
    specific = _SPECIFIC_EDGES.get(name)
    return st.one_of(specific, nasty()) if specific is not None else nasty()


@st.composite
def request_body(
    draw: st.DrawFn,
    required: dict[str, st.SearchStrategy[Any]],
    optional: dict[str, st.SearchStrategy[Any]],
    extra_edges: tuple[str, ...],
) -> Any:
    """A plausible body with up to three fields pushed to an edge; now and then a required field
    missing, a field the server does not know, or no JSON object at all."""
    # Each rare branch fires on one middle value: hypothesis favours the ends of a range.
    if draw(st.integers(min_value=0, max_value=24)) == 12:
        return draw(nasty())
    body = draw(st.fixed_dictionaries(required, optional=optional))
    edge_names = sorted({*required, *optional, *extra_edges})
    names = draw(st.lists(st.sampled_from(edge_names), max_size=3, unique=True))
    # Half the time one of the numeric sampling knobs too: they are what reaches the sampler.
    if draw(st.booleans()):
        names.append(draw(st.sampled_from(SAMPLER_KNOBS)))
    for name in names:
        body[name] = draw(_edge(name))
    if draw(st.integers(min_value=0, max_value=19)) == 9:
        body.pop(draw(st.sampled_from(sorted(set(required) - {"max_tokens"}))), None)
    if draw(st.integers(min_value=0, max_value=19)) == 10:
        body[draw(texts(8))] = draw(nasty())
    return body


COMPLETION_BODY = request_body(
    {"prompt": PROMPT_VALID, "max_tokens": MAX_TOKENS_VALID}, COMPLETION_VALID, ("best_of", "suffix")
)
CHAT_BODY = request_body(
    {"messages": st.lists(MESSAGE_VALID, min_size=1, max_size=3), "max_tokens": MAX_TOKENS_VALID},
    CHAT_VALID,
    ("tools",),
)


# --- checks ---


def _record_finding(path: str, body: Any, status: int | str, excerpt: str) -> None:
    """Append a failure to $QUIRE_FUZZ_FINDINGS at once, so it can be routed before the run ends."""
    if not FINDINGS:
        return
    shown = json.dumps(body, allow_nan=True)
    line = f"- `{path}` -> {status}: body `{shown[:600]}` -> response `{excerpt[:300]!r}`\n"
    with open(FINDINGS, "a", encoding="utf-8") as out:
        out.write(line)


def _error_problem(payload: Any) -> str | None:
    """Why ``payload`` is not an OpenAI error body, or None if it is one."""
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
        return "not {'error': {...}}"
    error = payload["error"]
    missing = [k for k in ("message", "type", "param", "code") if k not in error]
    if missing:
        return f"error object lacks {missing}"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return "message and type must be strings"
    return None


def _server_side(error: dict[str, Any]) -> bool:
    code = error.get("code")
    return error.get("type") in ("server_error", "internal_server_error", "service_unavailable") or (
        isinstance(code, int) and code >= 500
    )


def _stream_problem(text: str) -> str | None:
    """Why an SSE body is broken (no [DONE], an unparseable or server-side error event), or None."""
    events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    if not events or events[-1] != "[DONE]":
        return "stream does not end with [DONE]"
    for event in events[:-1]:
        try:
            payload = json.loads(event)
        except ValueError:
            return f"unparseable event {event[:80]!r}"
        if isinstance(payload, dict) and "error" in payload:
            problem = _error_problem(payload)
            if problem:
                return f"stream error event: {problem}"
            if _server_side(payload["error"]):
                return f"server-side stream error event: {payload['error']}"
    return None


def _problem(response: httpx.Response, text: str) -> str | None:
    if response.status_code >= 500:
        return f"status {response.status_code}"
    if response.status_code >= 400:
        try:
            return _error_problem(json.loads(text))
        except ValueError:
            return "error body is not JSON"
    if "text/event-stream" in response.headers.get("content-type", ""):
        return _stream_problem(text)
    try:
        payload = json.loads(text)
    except ValueError:
        return "200 body is not JSON"
    return None if isinstance(payload, dict) and "choices" in payload else "200 body has no choices"


def check(client: httpx.Client, path: str, body: Any) -> None:
    # NaN/Infinity literals too: Python's JSON reader accepts them.
    content = Deep.splice(json.dumps(body, allow_nan=True)).encode()
    try:
        with client.stream("POST", path, content=content) as response:
            text = response.read().decode("utf-8", errors="replace")
    except httpx.TimeoutException:
        _record_finding(path, body, "timeout", f"no answer in {REQUEST_TIMEOUT_S} s")
        raise
    problem = _problem(response, text)
    if problem is None and client.get("/health").status_code != 200:
        # Caught at the request that did it, not at whichever example comes next.
        problem = f"the server is unhealthy after this request ({response.status_code})"
    if problem:
        _record_finding(path, body, response.status_code, f"{problem}: {text[:240]}")
    assert problem is None, f"{path} {body!r:.300} -> {response.status_code} {problem}: {text[:300]}"


# --- the tests ---


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # A short context: a body whose max_tokens ends up null generates to its end, in a second or two.
    with running_server("--api-key", API_KEY, "--max-num-seqs", "16", "--max-model-len", "128") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=REQUEST_TIMEOUT_S) as c:
        yield c


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=FUZZ_SEED == 0,
    database=None,  # failures are reported (and appended to QUIRE_FUZZ_FINDINGS), not replayed
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


# Issue 11's reproductions, always run first whatever the generator draws.
KNOWN_COMPLETION_BODIES = [
    {"prompt": "hello", "max_tokens": 4, "top_p": 1e-50},
    {"prompt": "hello", "max_tokens": 4, "repetition_penalty": 1e-50},
    {"prompt": "hello", "max_tokens": 4, "temperature": 1e39, "min_tokens": 3},
    {"prompt": "hello", "max_tokens": 4, "seed": 2**64},
    {"prompt": "hello", "max_tokens": 4, "priority": 2**64},
    {"prompt": "hello", "max_tokens": 4, "top_k": 2**64},
    {"prompt": "\ud800", "max_tokens": 4},
    {"prompt": "hello", "max_tokens": 4, "stream": True, "top_p": 5e-324},
]
KNOWN_CHAT_BODIES = [
    {"messages": [{"role": "user", "content": "a\udfffb"}], "max_tokens": 4},
    {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "chat_template_kwargs": {"messages": 1},
    },
    {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "chat_template_kwargs": {"add_generation_prompt": [1]},
    },
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True, "temperature": 1e39},
]


def _with_examples(bodies: list[dict[str, Any]]):
    def decorate(test):
        for body in reversed(bodies):
            test = example(body=body)(test)
        return test

    return decorate


@seed(FUZZ_SEED)
@FUZZ_SETTINGS
@_with_examples(KNOWN_COMPLETION_BODIES)
@given(body=COMPLETION_BODY)
def test_fuzz_completions(client: httpx.Client, body: Any) -> None:
    check(client, "/v1/completions", body)


@seed(FUZZ_SEED)
@FUZZ_SETTINGS
@_with_examples(KNOWN_CHAT_BODIES)
@given(body=CHAT_BODY)
def test_fuzz_chat_completions(client: httpx.Client, body: Any) -> None:
    check(client, "/v1/chat/completions", body)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b"null",
        b"1e999",
        b'"\\ud800"',
        b"[" * 100_000,
        b'{"prompt": ' + b"[" * 50_000,
        b"\xff\xfe",
    ],
)
def test_malformed_json_is_a_clean_400(client: httpx.Client, path: str, raw: bytes) -> None:
    response = client.post(path, content=raw)
    if 400 <= response.status_code < 500:
        assert _error_problem(response.json()) is None
        return
    _record_finding(path, raw[:80].decode(errors="replace"), response.status_code, response.text[:240])
    raise AssertionError(f"{path} {raw[:40]!r} -> {response.status_code}: {response.text[:300]}")


def test_server_still_answers_after_the_fuzzing(server: ServerProcess, client: httpx.Client) -> None:
    # Runs last in this module (pytest keeps file order): the engine survived everything above.
    import openai

    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    result = oa.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0.0)
    assert result.choices[0].finish_reason in ("length", "stop")
    chat = oa.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0
    )
    assert chat.choices[0].finish_reason in ("length", "stop")
    # Nothing fuzzed is left in the engine (the gauges follow the engine's steps: poll briefly).
    deadline = time.monotonic() + 15
    while True:
        metrics = server.metrics()
        busy = {k: v for k, v in metrics.items() if k.startswith(BUSY_GAUGES) and v}
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not busy, f"fuzzed requests still hold the engine: {busy}"
