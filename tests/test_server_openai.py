"""The OpenAI-compatible API end to end: the real server, the official ``openai`` client, raw SSE.

One server process (the built-in demo checkpoint) is shared by the whole module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from quire import LLM, SamplingParams

from server_fixtures import FAST_ARGS, ServerProcess, running_server

PROMPT = "The quick brown fox"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline() -> LLM:
    """The same demo checkpoint and settings, offline: the server must match it token for token."""
    args = dict(zip(FAST_ARGS[::2], FAST_ARGS[1::2], strict=True))
    return LLM(
        max_model_len=int(args["--max-model-len"]),
        kv_cache_memory=args["--kv-cache-memory"],
        dtype=args["--dtype"],
        show_progress=False,
    )


def test_completion_greedy_matches_offline(client: openai.OpenAI, offline: LLM) -> None:
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    result = client.completions.create(
        model="quire-demo", prompt=PROMPT, max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert result.choices[0].text == expected.outputs[0].text
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12

    chunks = list(
        client.completions.create(
            model="quire-demo", prompt=PROMPT, max_tokens=12, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_greedy_matches_offline(client: openai.OpenAI, offline: LLM) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again."},
    ]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = offline.chat(messages, params)[0].outputs[0].text
    result = client.chat.completions.create(
        model="quire-demo",
        messages=messages,
        max_completion_tokens=10,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected
    assert result.usage.completion_tokens == 10

    stream = client.chat.completions.create(
        model="quire-demo", messages=messages, max_tokens=10, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_n2_with_logprobs(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="quire-demo",
        prompt=PROMPT,
        n=2,
        max_tokens=6,
        logprobs=3,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in result.choices) == [0, 1]
    for choice in result.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
        assert all(logprob <= 0.0 for logprob in lp.token_logprobs)
        assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)  # 3 alternatives, plus the sampled token
        assert lp.text_offset == sorted(lp.text_offset)
    assert result.usage.completion_tokens == 12

    chat = client.chat.completions.create(
        model="quire-demo", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=5, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(c.index for c in chat.choices) == [0, 1]
    for choice in chat.choices:
        content = choice.logprobs.content
        assert len(content) == 5
        assert all(len(entry.top_logprobs) == 2 for entry in content)
        assert all(entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob for entry in content)

    streamed = list(
        client.completions.create(
            model="quire-demo", prompt=PROMPT, n=2, max_tokens=5, stream=True, extra_body={"ignore_eos": True}
        )
    )
    for index in (0, 1):
        finishes = [c.choices[0].finish_reason for c in streamed if c.choices[0].index == index]
        assert finishes.count("length") == 1 and finishes[-1] == "length"


def test_stop_string_truncates(client: openai.OpenAI) -> None:
    base = client.completions.create(
        model="quire-demo", prompt=PROMPT, max_tokens=24, temperature=0.0, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    stop = next(
        text[i : i + 3]
        for i in range(4, len(text) - 3)
        if text[i : i + 3].strip() and "\ufffd" not in text[i : i + 3]
    )
    expected = text[: text.find(stop)]
    for stream in (False, True):
        result = client.completions.create(
            model="quire-demo", prompt=PROMPT, max_tokens=24, temperature=0.0, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(result)
            assert "".join(c.choices[0].text for c in chunks) == expected
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert result.choices[0].text == expected
            assert result.choices[0].finish_reason == "stop"


def test_seed_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        result = client.completions.create(
            model="quire-demo",
            prompt=PROMPT,
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return result.choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_prompt_forms_and_vllm_extensions(client: openai.OpenAI, server: ServerProcess) -> None:
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = client.completions.create(model="quire-demo", prompt=PROMPT, max_tokens=4, temperature=0.0)
    by_ids = client.completions.create(model="quire-demo", prompt=ids, max_tokens=4, temperature=0.0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    several = client.completions.create(
        model="quire-demo",
        prompt=[ids, ids[:2]],
        max_tokens=3,
        extra_body={"ignore_eos": True, "min_tokens": 3},
    )
    assert [c.index for c in several.choices] == [0, 1]
    assert several.usage.prompt_tokens == len(ids) + 2 and several.usage.completion_tokens == 6
    strings = client.completions.create(
        model="quire-demo", prompt=["a b", "c d"], n=2, max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in strings.choices) == [0, 1, 2, 3]
    default_len = client.completions.create(
        model="quire-demo", prompt=PROMPT, extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.05,
                                                       "repetition_penalty": 1.1, "priority": 1}
    )  # fmt: skip
    assert default_len.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions
    echoed = client.completions.create(model="quire-demo", prompt=PROMPT, max_tokens=2, echo=True)
    assert echoed.choices[0].text.startswith(PROMPT)


def test_tokenize_detokenize_models_version(server: ServerProcess) -> None:
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_MODEL_LEN
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back["prompt"].endswith("hello world")
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 1
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "quire-demo"
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_request_id_is_echoed(server: ServerProcess) -> None:
    response = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers={"X-Request-Id": "trace-42"},
    )
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["id"] == "cmpl-trace-42"
    generated = httpx.get(f"{server.url}/v1/models").headers["x-request-id"]
    assert generated.startswith("req-")
    log = server.log_text()
    assert '"request_id": "trace-42"' in log
    assert PROMPT not in log  # no prompt or completion text without --log-prompts


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["type"] and body["message"]
    return body["message"]


def test_bad_input_is_4xx_never_500(server: ServerProcess, client: openai.OpenAI) -> None:
    url = f"{server.url}/v1/completions"
    long_prompt = list(range(10, 10 + MAX_MODEL_LEN + 20))
    message = _error(httpx.post(url, json={"prompt": long_prompt, "max_tokens": 4}), 400)
    assert str(len(long_prompt)) in message and str(MAX_MODEL_LEN) in message
    message = _error(httpx.post(url, json={"prompt": list(range(10, 500)), "max_tokens": 100}), 400)
    assert "490" in message and str(MAX_MODEL_LEN) in message

    headers = {"content-type": "application/json"}
    assert "JSON" in _error(httpx.post(url, content=b'{"prompt": "x",', headers=headers), 400)
    _error(httpx.post(url, content=b"[1, 2]", headers=headers), 400)
    _error(httpx.post(url, json={"prompt": "x", "max_tokens": "many"}), 400)
    _error(httpx.post(url, json={"prompt": {"nested": True}}), 400)
    _error(httpx.post(url, json={"prompt": []}), 400)
    _error(httpx.post(url, json={"prompt": "x", "temperature": -1}), 400)
    _error(httpx.post(url, json={"prompt": "x", "top_p": 7}), 400)
    _error(httpx.post(url, json={"prompt": "x", "logit_bias": {"abc": 1}}), 400)
    _error(httpx.post(url, json={"prompt": [99999]}), 400)
    _error(httpx.post(url, json={"prompt": "x", "n": 0}), 400)
    _error(httpx.post(url, json={"prompt": "x", "max_tokens": 0}), 400)
    _error(httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []}), 400)
    _error(
        httpx.post(
            f"{server.url}/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}
        ),
        400,
    )
    _error(httpx.post(f"{server.url}/v1/chat/completions", json={"messages": "hi"}), 400)
    _error(httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]}), 400)

    message = _error(httpx.post(url, json={"prompt": "x", "model": "gpt-9"}), 404)
    assert "gpt-9" in message
    _error(httpx.get(f"{server.url}/v1/nothing-here"), 404)
    _error(httpx.post(url, content=b"x" * (5 << 20), headers=headers), 413)

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="quire-demo", prompt="x", max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "Traceback" not in server.log_text()


def test_raw_sse_format(server: ServerProcess) -> None:
    body = {"prompt": PROMPT, "max_tokens": 3, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(p["object"] == "text_completion" and "usage" not in p for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
