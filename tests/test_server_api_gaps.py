"""Small API surface a new user expects: ``GET /v1/models/{model}``, CORS, ``--chat-template``,
``--generation-config``, ``--root-path``, TLS, and the request-field policy (unknown and
unsupported fields are 400s naming them; legitimate no-op fields and what the official ``openai``
SDK and LangChain send by default are accepted).

Two servers cover it all. ``proxied``: a tiny model whose generation_config.json sets sampling
defaults (``--generation-config auto``), a chat template file, CORS, an API key and a root path.
``tls``: the same model with ``--generation-config vllm``, an inline chat template and HTTPS.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server_fixtures import FAST_ARGS, STARTUP_TIMEOUT_S, ServerProcess, running_server

KEY = "sk-gaps"
ORIGIN = "https://app.example"
FILE_TEMPLATE = (
    "{% for m in messages %}<<{{ m.role }}|{{ m.content }}>>{% endfor %}"
    "{% if add_generation_prompt %}[bot]{% endif %}"
)
INLINE_TEMPLATE = "{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}"
GENERATION_DEFAULTS = {"temperature": 0.5, "top_k": 1, "max_new_tokens": 5, "do_sample": True}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny Llama whose generation_config.json also carries sampling defaults."""
    out = tmp_path_factory.mktemp("gaps") / "model"
    shutil.copytree(tiny_model_dir("llama"), out)
    config = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**config, **GENERATION_DEFAULTS}))
    return out


@pytest.fixture(scope="module")
def proxied(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(FILE_TEMPLATE)
    args = [str(model_dir), "--served-model-name", "org/model-a", "tiny", "--api-key", KEY]
    args += ["--chat-template", str(template), "--root-path", "/llm"]
    args += ["--allowed-origins", json.dumps([ORIGIN]), "--allowed-methods", '["GET", "POST"]']
    with running_server(*args) as srv:
        yield srv


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _post(server: ServerProcess, path: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/{path}", json={"model": "tiny", **body}, headers=_headers(), timeout=60
    )


def _error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["type"] == "invalid_request_error"
    return error


# -- /v1/models/{model} ----------------------------------------------------------------------------


def test_model_by_id(proxied: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{proxied.url}/v1", api_key=KEY, max_retries=0)
    for name in ("tiny", "org/model-a"):
        model = client.models.retrieve(name)
        assert model.id == name and model.object == "model"
    listed = httpx.get(f"{proxied.url}/v1/models", headers=_headers()).json()["data"]
    assert httpx.get(f"{proxied.url}/v1/models/tiny", headers=_headers()).json() == listed[1]
    error = _error(httpx.get(f"{proxied.url}/v1/models/nope", headers=_headers()), 404)
    assert error["code"] == "model_not_found" and "nope" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("org/other")
    assert httpx.get(f"{proxied.url}/v1/models/tiny").status_code == 401  # auth applies


# -- CORS ------------------------------------------------------------------------------------------


def test_cors_preflight_and_headers(proxied: ServerProcess) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    # Answered before authentication: a browser sends no key with a preflight.
    response = httpx.options(f"{proxied.url}/v1/chat/completions", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    refused = httpx.options(
        f"{proxied.url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    delete = httpx.options(
        f"{proxied.url}/v1/models", headers={**preflight, "Access-Control-Request-Method": "DELETE"}
    )
    assert delete.status_code == 400  # only GET and POST allowed
    # Actual responses, errors included, carry the header so the page can read them.
    ok = httpx.get(f"{proxied.url}/v1/models", headers={"Origin": ORIGIN, **_headers()})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    denied = httpx.get(f"{proxied.url}/v1/models", headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{proxied.url}/v1/models", headers={"Origin": "https://evil.example", **_headers()})
    assert "access-control-allow-origin" not in other.headers


# -- --root-path -----------------------------------------------------------------------------------


def test_root_path(proxied: ServerProcess) -> None:
    # The proxy strips /llm and forwards /v1/...; links the app writes (the OpenAPI servers) carry it.
    assert httpx.get(f"{proxied.url}/v1/models", headers=_headers()).status_code == 200
    schema = httpx.get(f"{proxied.url}/openapi.json").json()
    assert {"url": "/llm"} in schema.get("servers", [])
    assert "404" in schema["paths"]["/v1/models/{model}"]["get"]["responses"]
    # The route rules (auth above all) see the route, not the prefixed path.
    assert httpx.get(f"{proxied.url}/v1/models").status_code == 401
    assert httpx.post(f"{proxied.url}/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(f"{proxied.url}/health").status_code == 200


# -- --chat-template -------------------------------------------------------------------------------


def _rendered(server: ServerProcess, messages: list[dict[str, str]], **client_args: Any) -> str:
    with httpx.Client(**client_args) as http:
        tokens = http.post(
            f"{server.url}/tokenize", json={"messages": messages}, headers=_headers(), timeout=30
        ).json()["tokens"]
        detok = http.post(f"{server.url}/detokenize", json={"tokens": tokens}, headers=_headers(), timeout=30)
        return detok.json()["prompt"]


def test_chat_template_from_a_file(proxied: ServerProcess) -> None:
    messages = [{"role": "system", "content": "be brief"}, *HI]
    assert _rendered(proxied, messages) == "<<system|be brief>><<user|hi>>[bot]"
    usage = _post(proxied, "chat/completions", messages=messages, max_tokens=1).json()["usage"]
    assert usage["prompt_tokens"] > 0


# -- --generation-config auto ----------------------------------------------------------------------


def test_generation_config_auto_sets_defaults(proxied: ServerProcess) -> None:
    assert "temperature=0.5, top_k=1, max_tokens=5" in proxied.log_text()
    # max_new_tokens is the default max_tokens (instead of the completions API's 16) ...
    texts = []
    for seed in (1, 2, 3):
        body = _post(proxied, "completions", prompt="hello", seed=seed, ignore_eos=True).json()
        assert body["usage"]["completion_tokens"] == 5
        texts.append(body["choices"][0]["text"])
    # ... and top_k=1 makes sampling greedy: the seed no longer matters.
    assert len(set(texts)) == 1
    # A request's own values win.
    body = _post(
        proxied, "completions", prompt="hello", max_tokens=7, ignore_eos=True, top_k=0, seed=1
    ).json()
    assert body["usage"]["completion_tokens"] == 7


def test_generation_config_auto_applies_to_chat(proxied: ServerProcess) -> None:
    body = _post(proxied, "chat/completions", messages=HI, ignore_eos=True).json()
    assert body["usage"]["completion_tokens"] == 5


def test_generation_config_max_tokens_is_a_cap(proxied: ServerProcess) -> None:
    # Prompts leaving 3 tokens of the 512-token context: the default max_tokens (5) shrinks to
    # the room instead of making the request a 400, per prompt, for token ids and chat alike.
    [token] = _tokenize(proxied, {"prompt": "x", "add_special_tokens": False})
    body = _post(proxied, "completions", prompt=[token] * 509, ignore_eos=True).json()
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    body = _post(proxied, "completions", prompt=[[token] * 509, [token] * 200], ignore_eos=True).json()
    assert body["usage"]["completion_tokens"] == 3 + 5
    # The chat prompt is the template around the message; "x" is one token in this tokenizer.
    overhead = len(_tokenize(proxied, {"messages": [{"role": "user", "content": ""}]}))
    messages = [{"role": "user", "content": "x" * (509 - overhead)}]
    body = _post(proxied, "chat/completions", messages=messages, ignore_eos=True).json()
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (509, 3)
    assert body["choices"][0]["finish_reason"] == "length"
    # The request's own min_tokens outranks the default, and 4 do not fit.
    error = _error(_post(proxied, "completions", prompt=[token] * 509, min_tokens=4))
    assert "context length of 512" in error["message"], error
    # A max_tokens the request sets itself is checked as given; a prompt with no room is refused.
    error = _error(_post(proxied, "completions", prompt=[token] * 509, max_tokens=5))
    assert "max_tokens is 5" in error["message"] and "512" in error["message"], error
    error = _error(_post(proxied, "chat/completions", messages=messages, max_completion_tokens=5))
    assert "max_tokens is 5" in error["message"], error
    error = _error(_post(proxied, "completions", prompt=[token] * 512))
    assert "prompt has 512 tokens" in error["message"], error


@pytest.mark.parametrize("default", [None, 1, 5, 100])
@pytest.mark.parametrize(
    ("n", "min_tokens", "max_tokens"), [(1, 0, None), (3, 0, None), (2, 4, None), (2, 0, 7)]
)
def test_precheck_charge_is_the_least_of_any_admissible_prompt(
    default: int | None, n: int, min_tokens: int, max_tokens: int | None
) -> None:
    # precheck's charge (before the chat template) must never exceed what submit charges once the
    # prompt is known, or a tenant near its limit is refused a request submit would admit.
    from quire.sampling import SamplingParams
    from quire.server.openai.admission import _TokenLimit

    params = SamplingParams(n=n, min_tokens=min_tokens, max_tokens=max_tokens)
    limit = _TokenLimit(params, default, max_model_len=64)
    admissible = [p for p in range(1, 64) if limit.max_new_tokens(p) + p <= 64]
    assert admissible and limit.least_estimate() == min(limit.estimate(p) for p in admissible)
    for p in admissible:
        if max_tokens is None and default is None:
            assert limit.params_for(p).max_tokens is None  # the engine's "rest of the context"
        else:
            assert limit.params_for(p).max_tokens == limit.max_new_tokens(p) >= max(min_tokens, 1)


def _tokenize(server: ServerProcess, body: dict[str, Any]) -> list[int]:
    response = httpx.post(f"{server.url}/tokenize", json=body, headers=_headers(), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


# -- request fields ----------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_unknown_field_is_a_400_naming_it(proxied: ServerProcess, endpoint: str) -> None:
    prompt = {"messages": HI} if endpoint == "chat/completions" else {"prompt": "x"}
    error = _error(_post(proxied, endpoint, max_tokens=1, **prompt, frobnicate=True))
    assert error["param"] == "frobnicate" and "frobnicate" in error["message"]
    error = _error(
        _post(proxied, endpoint, max_tokens=1, **prompt, stream_options={"include_usage": True, "x": 1})
    )
    assert error["param"] == "stream_options.x"


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("functions", [{"name": "f", "parameters": {}}], "tools"),
        ("function_call", "auto", "tool_choice"),
        ("audio", {"voice": "alloy", "format": "wav"}, "audio"),
        ("modalities", ["text", "audio"], "text only"),
        ("prediction", {"type": "content", "content": "x"}, "predicted"),
        ("web_search_options", {}, "web search"),
        ("reasoning_effort", "low", "chat_template_kwargs"),
        ("store", True, "store"),
        ("service_tier", "flex", "one service tier"),
        ("use_beam_search", True, "beam search"),
    ],
)
def test_known_unsupported_fields_are_refused(
    proxied: ServerProcess, field: str, value: Any, words: str
) -> None:
    error = _error(_post(proxied, "chat/completions", messages=HI, max_tokens=1, **{field: value}))
    assert error["param"] == field and words in error["message"], error


def test_no_op_fields_are_accepted(proxied: ServerProcess) -> None:
    no_ops = {
        "user": "u-1",
        "safety_identifier": "s-1",
        "metadata": {"team": "search"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "in_memory",
        "modalities": ["text"],
        "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
    }
    response = _post(proxied, "chat/completions", messages=HI, max_tokens=2, **no_ops)
    assert response.status_code == 200, response.text
    assert response.text.rstrip().endswith("data: [DONE]")
    response = _post(proxied, "completions", prompt="x", max_tokens=1, user="u-1", service_tier=None)
    assert _error(response)["param"] == "service_tier"  # a chat field, not a completions one


def test_default_requests_of_the_sdk_and_langchain_are_accepted(proxied: ServerProcess) -> None:
    ChatOpenAI = pytest.importorskip("langchain_openai").ChatOpenAI

    seen: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> None:
        seen.append(json.loads(request.content))

    http = httpx.Client(event_hooks={"request": [record]}, timeout=60)
    client = openai.OpenAI(base_url=f"{proxied.url}/v1", api_key=KEY, max_retries=0, http_client=http)
    client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=2)
    list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, stream=True))
    client.completions.create(model="tiny", prompt="x", max_tokens=2)
    llm = ChatOpenAI(
        model="tiny", base_url=f"{proxied.url}/v1", api_key=KEY, max_retries=0, max_tokens=2,
        http_client=http, stream_usage=True, temperature=0.7, top_p=0.9, n=1,
    )  # fmt: skip
    assert llm.invoke("hi").content is not None
    assert [chunk.content for chunk in llm.stream("hi")]
    llm.invoke("hi", stop=["\n"])
    assert len(seen) == 6 and {"stream_options", "max_completion_tokens"} <= set().union(*seen)


# -- messages: what clients send back, and what is refused -------------------------------------------


def test_sdk_answers_go_back_into_messages(proxied: ServerProcess) -> None:
    # The openai SDK's idiom: messages.append(completion.choices[0].message). The message object is
    # sent back with what the answer carried (refusal: null) and, from the stream helper, more
    # (annotations, audio, function_call, parsed: null); none of it may be refused or reach the prompt.
    client = openai.OpenAI(base_url=f"{proxied.url}/v1", api_key=KEY, max_retries=0)
    messages: list[Any] = [*HI]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3)
    messages += [first.choices[0].message, {"role": "user", "content": "more"}]
    # The helper refuses an answer cut off by max_tokens; an EOS pushed to the top ends this one.
    [eos] = _tokenize(proxied, {"prompt": "<|im_end|>", "add_special_tokens": False})
    with client.chat.completions.stream(
        model="tiny", messages=messages, max_tokens=3, logit_bias={str(eos): 100}
    ) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0].message
    sent = streamed.model_dump(exclude_unset=True, mode="json")
    assert {"refusal", "annotations", "audio", "function_call", "parsed"} <= set(sent), sent
    messages += [streamed, {"role": "user", "content": "and?"}]
    last = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    echoed = [m if isinstance(m, dict) else m.model_dump(exclude_unset=True, mode="json") for m in messages]
    plain = [{"role": m["role"], "content": m["content"]} for m in echoed]
    assert _rendered(proxied, echoed) == _rendered(proxied, plain)
    assert last.usage is not None and last.usage.prompt_tokens == len(_tokenize(proxied, {"messages": plain}))


_ANSWER = {"role": "assistant", "content": "4"}


@pytest.mark.parametrize(
    ("message", "param", "words"),
    [
        ({**_ANSWER, "frobnicate": 1}, "messages.1.frobnicate", "Unrecognized request parameter"),
        (  # the legacy call field: it used to vanish from the history
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            "messages.1.function_call",
            "tool_calls",
        ),
        ({**_ANSWER, "reasoning_content": "2 + 2"}, "messages.1.reasoning_content", "reasoning"),
        ({**_ANSWER, "prefix": True}, "messages.1.prefix", "prefix"),
        ({**_ANSWER, "refusal": "I can't"}, "messages.1.refusal", "refusal"),
        ({**_ANSWER, "audio": {"id": "audio_1"}}, "messages.1.audio", "audio"),
        (
            {**_ANSWER, "annotations": [{"type": "url_citation", "url_citation": {}}]},
            "messages.1.annotations",
            "annotations",
        ),
        (
            {
                **_ANSWER,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}, "x": 1}
                ],
            },
            "messages.1.tool_calls.0.x",
            "'messages.1.tool_calls.0.x'",
        ),
        (
            {
                **_ANSWER,
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}", "strict": True}}],
            },
            "messages.1.tool_calls.0.function.strict",
            "'messages.1.tool_calls.0.function.strict'",
        ),
        (
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "4", "cache_control": {"type": "ephemeral"}}],
            },
            "messages.1.content",
            "'content.0.cache_control'",
        ),
    ],
)
def test_unknown_or_meaningful_message_fields_are_refused(
    proxied: ServerProcess, message: dict[str, Any], param: str, words: str
) -> None:
    messages = [*HI, message, {"role": "user", "content": "and?"}]
    error = _error(_post(proxied, "chat/completions", messages=messages, max_tokens=1))
    assert error["param"] == param and words in error["message"], error
    # The same message through /tokenize: the same refusal.
    response = httpx.post(
        f"{proxied.url}/tokenize", json={"messages": messages}, headers=_headers(), timeout=30
    )
    assert _error(response)["param"] == param


def test_echoed_fields_with_their_no_op_values_are_accepted(proxied: ServerProcess) -> None:
    answer = {
        **_ANSWER,
        "refusal": None,
        "annotations": [],
        "audio": None,
        "function_call": None,
        "reasoning_content": None,
        "reasoning": None,
        "prefix": False,
        "parsed": {"value": 4},
        "tool_calls": [],
    }
    response = _post(proxied, "chat/completions", messages=[*HI, answer, *HI], max_tokens=1)
    assert response.status_code == 200, response.text


def test_response_format_text_with_a_schema_is_refused(proxied: ServerProcess) -> None:
    # The schema would be dropped and the answer unconstrained: a 400, as for json_object.
    schema = {"name": "answer", "schema": {"type": "object"}}
    for kind in ("text", "json_object"):
        response_format = {"type": kind, "json_schema": schema}
        error = _error(
            _post(proxied, "chat/completions", messages=HI, max_tokens=1, response_format=response_format)
        )
        assert error["param"] == "response_format" and "takes no json_schema" in error["message"], error
    assert _post(
        proxied, "chat/completions", messages=HI, max_tokens=1, response_format={"type": "text"}
    ).is_success


# -- --generation-config vllm, an inline --chat-template, TLS ----------------------------------------


class TLSServer(ServerProcess):
    """``ServerProcess`` for an HTTPS server: waits for its https:// address, trusts its cert."""

    cert: str = ""
    listening_pattern = re.compile(r"listening on (https://[0-9.]+:\d+)")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"exited with code {self.proc.returncode} while loading")
            try:
                if httpx.get(f"{self.url}/health", verify=trust(self.cert), timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self._fail("/health did not turn 200 in time")


def trust(cert: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert)


@pytest.fixture(scope="module")
def tls(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a self-signed certificate with")
    where = tmp_path_factory.mktemp("tls")
    key, cert = where / "key.pem", where / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    TLSServer.cert = str(cert)
    args = [*FAST_ARGS, str(model_dir), "--served-model-name", "tiny", "--generation-config", "vllm"]
    args += ["--chat-template", INLINE_TEMPLATE, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
    server = TLSServer(args, where / "server.log")
    try:
        yield server
    finally:
        server.stop()


def test_tls(tls: TLSServer) -> None:
    assert tls.url.startswith("https://")
    http = httpx.Client(verify=trust(tls.cert), timeout=60)
    client = openai.OpenAI(base_url=f"{tls.url}/v1", api_key="unused", max_retries=0, http_client=http)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused by default
        httpx.get(f"{tls.url}/health")
    with pytest.raises(httpx.HTTPError):  # and plain HTTP is not spoken
        httpx.get(tls.url.replace("https://", "http://") + "/health", timeout=5)


def test_inline_chat_template_and_neutral_generation_config(tls: TLSServer) -> None:
    assert _rendered(tls, [{"role": "user", "content": "hi"}], verify=trust(tls.cert)) == "USER: hi\n"
    assert "quire's neutral values" in tls.log_text()
    http = httpx.Client(verify=trust(tls.cert), timeout=60)
    texts = set()
    for seed in (1, 2, 3):
        body = http.post(
            f"{tls.url}/v1/completions", json={"prompt": "hello", "seed": seed, "ignore_eos": True}
        ).json()
        assert body["usage"]["completion_tokens"] == 16  # the completions API's own default
        texts.add(body["choices"][0]["text"])
    assert len(texts) > 1  # temperature 1.0, no top-k: seeds matter again


def test_bad_flags_fail_at_start(tmp_path: Path, model_dir: Path) -> None:
    from quire.server.generation_defaults import load_sampling_defaults
    from quire.tokenizer.chat_template import read_template_argument

    with pytest.raises(ValueError, match="neither an existing file"):
        read_template_argument("/no/such/template.jinja")
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="temperature"):
        load_sampling_defaults(str(tmp_path), model_dir)
    with pytest.raises(ValueError, match="does not exist"):
        load_sampling_defaults(str(tmp_path / "missing"), model_dir)
    assert load_sampling_defaults("auto", model_dir).values() == {
        "temperature": 0.5,
        "top_k": 1,
        "max_tokens": 5,
    }
    assert load_sampling_defaults("none", model_dir).values() == {}


def test_flag_values_are_checked() -> None:
    from quire.entrypoints.cli import parse_args
    from quire.server.settings import ServerSettings

    ns = parse_args(["serve", "--allowed-origins", '["https://a.example"]', "--root-path", "/llm"])
    assert ns.allowed_origins == ["https://a.example"] and ns.allowed_methods == ["*"]
    with pytest.raises(SystemExit):
        parse_args(["serve", "--allowed-origins", "https://a.example"])  # not a JSON list
    with pytest.raises(ValueError, match="root_path"):
        ServerSettings(root_path="llm/")
    with pytest.raises(ValueError, match="both"):
        ServerSettings(ssl_keyfile="key.pem")
