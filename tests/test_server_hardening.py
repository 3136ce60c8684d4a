"""Hardening of the API edge (issue 11): no request input can leak admission seats, stall the
event loop, reach the tokenizer past its tenant's rate limit or turn into a 500, and requests that
fail after their 200 (engine error, shutdown) end with an OpenAI error their client sees.

One server for most of the module: three admissible sequences (two running, one queued), so a
leak of a few seats shows as 503s; prompts of a few MB allowed, so tokenizing one takes seconds.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from starlette.requests import Request

from quire.config import EngineArgs
from quire.frontend import protocol
from quire.frontend.async_client import InProcessEngineClient, RequestStream
from quire.frontend.input_processor import ProcessedPrompt
from quire.sampling import CompletionOutput, RequestMetrics, RequestOutput, SamplingParams
from quire.server.auth import Tenant
from quire.server.errors import APIError
from quire.server.metrics import ServerMetrics
from quire.server.openai.admission import submit
from quire.server.openai.serving import EngineRequestError, Generation, Job
from quire.server.openai.streaming import collect_choices, stream_chunks
from quire.server.ratelimit import RateLimiter, RateLimits
from quire.server.settings import ServerSettings
from quire.server.sse import DONE, ChunkFramer
from quire.server.state import RequestContext

from server_fixtures import ServerProcess, running_server

MAIN_KEY = "sk-main-0123456789abcdef"
LIMITED_KEY = "sk-limited-0123456789abcdef"
HUGE = 2**64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    key_file = Path(tmp_path_factory.mktemp("keys")) / "keys.json"
    limited = {"tenant": "limited", "limits": {"requests_per_minute": 1, "request_burst": 1}}
    key_file.write_text(json.dumps({"keys": {MAIN_KEY: "main", LIMITED_KEY: limited}}))
    args = ["--api-key-file", str(key_file), "--max-num-seqs", "2", "--max-waiting", "1"]
    args += ["--max-body-bytes", str(8 << 20), "--max-prompt-bytes", str(4 << 20)]
    with running_server(*args) as srv:
        yield srv


def _post(server: ServerProcess, path: str, body: object, key: str = MAIN_KEY) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def _post_raw(server: ServerProcess, path: str, raw: bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {MAIN_KEY}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=raw, headers=headers, timeout=60)


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


# -- defect 2: integers past 64 bits -------------------------------------------------------------

HUGE_COMPLETIONS = [
    {"seed": HUGE},
    {"seed": -HUGE},
    {"priority": HUGE},
    {"top_k": HUGE},
    {"max_tokens": HUGE},
    {"min_tokens": HUGE},
    {"stop_token_ids": [HUGE]},
    {"logit_bias": {str(HUGE): 1.0}},
    {"prompt": [HUGE]},
    {"prompt": [[1, 2], [HUGE]]},
    {"best_of": HUGE},
]


@pytest.mark.parametrize("extra", HUGE_COMPLETIONS, ids=lambda e: next(iter(e)))
def test_huge_integers_are_400(server: ServerProcess, extra: dict) -> None:
    _assert_openai_error(_post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **extra}), 400)


def test_huge_integers_leak_no_admission_seats(server: ServerProcess) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra in ({"seed": HUGE}, {"priority": HUGE}, {"top_k": HUGE}, {"max_completion_tokens": HUGE}):
        _assert_openai_error(_post(server, "/v1/chat/completions", {**chat, **extra}), 400)
    for extra in HUGE_COMPLETIONS:  # more requests than the server has seats
        _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **extra})
    # n=3 needs every seat (two running + one queued) free: none leaked.
    ok = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": 3})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["choices"]) == 3


def test_failed_send_is_uncounted() -> None:
    """A request that fails after being counted (here: its send to the engine) gives its seats back."""

    async def run() -> None:
        client = InProcessEngineClient(
            EngineArgs(max_model_len=256, kv_cache_memory="16MiB", dtype="float32", show_progress=False)
        )
        await client.start()
        try:
            send = client._send

            def failing_send(message: protocol.EngineInput) -> None:
                if isinstance(message, protocol.AddRequest):
                    raise OverflowError("int too big to convert")  # what msgspec raised for 2**64
                send(message)

            client._send = failing_send  # type: ignore[method-assign]
            processor = client.input_processor
            assert processor is not None
            processed, request = processor.make_request("r1", "hello", SamplingParams(n=3, max_tokens=2))
            with pytest.raises(OverflowError):
                client.add_request(processed, request)
            assert client.num_unfinished_seqs == 0 and client.num_unfinished_requests == 0
            client._send = send  # type: ignore[method-assign]
            outputs = [o async for o in client.generate("hello", SamplingParams(max_tokens=2))]
            assert outputs[-1].finished
            assert client.num_unfinished_seqs == 0
        finally:
            await client.shutdown()

    asyncio.run(run())


def test_non_finite_floats_are_400(server: ServerProcess) -> None:
    raw = b'{"prompt": "hi", "max_tokens": 2, "temperature": 1e999}'
    _assert_openai_error(_post_raw(server, "/v1/completions", raw), 400)


# -- defect 9: lone surrogates -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}'),
        ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stop": "\\ud800"}'),
        ("/tokenize", b'{"prompt": "\\ud800"}'),
        ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ],
)
def test_lone_surrogate_is_400(server: ServerProcess, path: str, raw: bytes) -> None:
    error = _assert_openai_error(_post_raw(server, path, raw), 400)
    assert "surrogate" in error["message"]


# -- defect 4: rate limit and size limit before tokenizing; tokenizing off the event loop ---------


def _text(num_bytes: int) -> str:
    # Varied words, so the tokenizer has real work (about 2.5 bytes per token).
    words = [f"w{i % 997}x" for i in range(num_bytes // 6)]
    return " ".join(words)[:num_bytes]


def test_rate_limited_tenant_gets_429_without_tokenizing(server: ServerProcess) -> None:
    big = _text(3_500_000)  # seconds of tokenizing on these machines
    assert _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, LIMITED_KEY).status_code == 200
    started = time.monotonic()
    limited = _post(server, "/v1/completions", {"prompt": big, "max_tokens": 1}, LIMITED_KEY)
    elapsed = time.monotonic() - started
    assert _assert_openai_error(limited, 429)["code"] == "rate_limit_exceeded"
    # Tokenizing it alone takes several seconds: the 429 came before the tokenizer ran.
    assert elapsed < 1.5, f"429 took {elapsed:.2f} s"
    started = time.monotonic()
    chat = {"messages": [{"role": "user", "content": big}], "max_tokens": 1}
    limited = _post(server, "/v1/chat/completions", chat, LIMITED_KEY)
    elapsed = time.monotonic() - started
    assert _assert_openai_error(limited, 429)["code"] == "rate_limit_exceeded"
    assert elapsed < 1.5, f"429 took {elapsed:.2f} s: the chat template was rendered first"


def test_rate_limit_settles_on_the_real_token_count() -> None:
    now = [0.0]
    limits = RateLimits(tokens_per_minute=60, token_burst=100)
    limiter = RateLimiter(lambda tenant: limits, clock=lambda: now[0])
    assert limiter.check("t", 10).allowed  # the guess made before tokenizing
    assert limiter.settle("t", 10, 130).retryable is False  # more than the burst: refused, refunded
    assert limiter.peek("t", 100).allowed  # ... so the whole burst is there again
    assert limiter.check("t", 10).allowed
    assert limiter.settle("t", 10, 95).allowed  # charged in full, 5 left
    assert not limiter.peek("t", 6).allowed and limiter.peek("t", 5).allowed
    assert limiter.check("t", 50).allowed is False
    assert limiter.check("t", 5).allowed
    assert limiter.settle("t", 5, 20).allowed  # debt: 15 below zero
    now[0] = 15.0  # one token per second
    assert not limiter.peek("t", 1).allowed
    now[0] = 16.0
    assert limiter.peek("t", 1).allowed
    assert limiter.settle("t", 1, 0).allowed  # a refund never exceeds the burst


def test_refused_settlement_refunds_the_charge_once() -> None:
    """A prompt whose real token count is past the tenant's burst (its pre-tokenizing guess was
    not) is refused, and the guess charged for it comes back once, not twice."""
    limits = RateLimits(tokens_per_minute=60, token_burst=100)
    limiter = RateLimiter(lambda tenant: limits, clock=lambda: 0.0)
    processor = SimpleNamespace(
        process_prompt=lambda prompt: ProcessedPrompt(prompt, [1] * len(prompt)),
        make_request=lambda engine_id, prompt, params, priority, salt: (
            ProcessedPrompt(prompt["prompt"], prompt["prompt_token_ids"]),
            None,
        ),
        max_model_len=1000,
    )
    client = SimpleNamespace(
        input_processor=processor,
        info=SimpleNamespace(max_model_len=1000),
        num_unfinished_seqs=0,
        new_request_id=lambda: "r1",
    )
    state = SimpleNamespace(
        engine=lambda: client,
        settings=ServerSettings(),
        metrics=ServerMetrics("m"),
        limiter=limiter,
        max_num_seqs=4,
    )
    assert limiter.check("t", 50).allowed  # 50 of the 100 left
    ctx = RequestContext(request_id="x", endpoint="/v1/completions", tenant="t")
    params = SamplingParams(max_tokens=1)
    with pytest.raises(APIError) as refused:  # guessed 120 // 6 + 1 = 21 tokens, really 121
        asyncio.run(submit(state, ctx, Tenant("t"), ["a" * 120], params, 0, False))  # type: ignore[arg-type]
    assert refused.value.status == 400
    assert limiter.peek("t", 50).allowed and not limiter.peek("t", 51).allowed


def test_prompt_over_max_prompt_bytes_is_413(server: ServerProcess) -> None:
    started = time.monotonic()
    response = _post(server, "/v1/completions", {"prompt": "é" * 2_200_000, "max_tokens": 1})
    error = _assert_openai_error(response, 413)
    assert "max_prompt_bytes" in error["message"] and error["param"] == "prompt"
    assert time.monotonic() - started < 1.5
    tokenize = _post(server, "/tokenize", {"prompt": "a" * (4 << 20) + "a"})
    assert "max_prompt_bytes" in _assert_openai_error(tokenize, 413)["message"]


def test_chat_prompt_over_max_prompt_bytes_is_a_counted_413(server: ServerProcess) -> None:
    key = "quire:requests_rejected_total{reason=too_long}"
    before = server.metrics()[key]
    chat = {"messages": [{"role": "user", "content": "é" * 2_200_000}], "max_tokens": 1}
    error = _assert_openai_error(_post(server, "/v1/chat/completions", chat), 413)
    assert "max_prompt_bytes" in error["message"] and error["param"] == "messages"
    assert error["code"] == "prompt_too_large"
    assert server.metrics()[key] == before + 1  # counted like a completion prompt's 413


def test_health_answers_while_a_long_prompt_is_tokenized(server: ServerProcess) -> None:
    big = _text(1_500_000)
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        result["response"] = _post(server, "/v1/completions", {"prompt": big, "max_tokens": 1})

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.3)  # the body is uploaded and parsed; tokenizing takes seconds from here
    worst = 0.0
    with httpx.Client(timeout=10) as client:
        while sender.is_alive():
            started = time.monotonic()
            assert client.get(f"{server.url}/health").status_code == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.05)
    sender.join()
    # Far longer than the context: refused once its length is known, as a 400.
    error = _assert_openai_error(result["response"], 400)
    assert "token" in error["message"]
    assert worst < 0.5, f"/health took {worst:.2f} s while a prompt was tokenized"


# -- 15: OpenAPI documents the 400s the server returns -------------------------------------------


def test_openapi_documents_openai_errors_not_422(server: ServerProcess) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        responses = schema["paths"][path]["post"]["responses"]
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "429" in schema["paths"]["/v1/completions"]["post"]["responses"]
    assert schema["components"]["schemas"]["ErrorResponse"]["required"] == ["error"]


def test_no_500s(server: ServerProcess) -> None:
    log = server.log_text()
    assert '"status": 500' not in log and "Traceback" not in log


# -- defect 12: requests still running at the shutdown timeout get an error, not a cut body --------


def test_shutdown_timeout_ends_requests_with_an_error_not_a_cut_body() -> None:
    with running_server("--max-model-len", "4096", "--shutdown-timeout", "1") as srv:
        body = {"prompt": "twice", "max_tokens": 4000, "ignore_eos": True}
        results: dict[str, object] = {}

        def raw_stream(started: threading.Event) -> None:
            lines: list[str] = []
            with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
            results["lines"] = lines

        def plain() -> None:
            results["plain"] = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)

        streaming = threading.Event()
        threads = [threading.Thread(target=raw_stream, args=(streaming,)), threading.Thread(target=plain)]
        for thread in threads:
            thread.start()
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="-", max_retries=0, timeout=60)
        stream = client.completions.create(
            model="quire-demo", prompt="once", stream=True, max_tokens=4000, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        next(chunks)  # admitted and generating
        assert streaming.wait(30)
        time.sleep(0.2)  # the non-streaming request is admitted too
        srv.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in chunks:
                pass
        for thread in threads:
            thread.join(30)
        lines = results["lines"]
        assert isinstance(lines, list) and lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][len("data: ") :])["error"]
        assert error["code"] == "server_shutdown" and error["type"] == "service_unavailable"
        plain_response = results["plain"]
        assert isinstance(plain_response, httpx.Response)
        assert _assert_openai_error(plain_response, 503)["code"] == "server_shutdown"
        assert srv.proc.wait(30) == 0


# -- defect 1 (server side): a sequence the engine failed ----------------------------------------


class _Client:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort_now(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _generation(outputs: list[RequestOutput], streaming: bool) -> Generation:
    """A real Generation over one real stream fed ``outputs``, with the server policy it reads."""
    state = SimpleNamespace(
        settings=ServerSettings(),
        metrics=ServerMetrics("m"),
        limiter=RateLimiter(lambda tenant: RateLimits()),
        client=_Client(),
        live_generations=set(),
    )
    stream = RequestStream("req-0", 1)
    for output in outputs:
        stream.put(output)
    job = Job(0, "req-0", ProcessedPrompt("hi", [1, 2]), stream, time.monotonic())
    ctx = RequestContext(request_id="r", endpoint="/v1/completions")
    params = SamplingParams(max_tokens=8)
    return Generation(state, ctx, Tenant("t"), params, [job], 10, streaming)  # type: ignore[arg-type]


def _output(text: str, finish_reason: str | None) -> RequestOutput:
    seq = CompletionOutput(index=0, text=text, token_ids=[5], finish_reason=finish_reason)
    return RequestOutput(
        "req-0", "hi", [1, 2], [seq], finished=finish_reason is not None, metrics=RequestMetrics(0.0)
    )


class _Formatter:
    def opening(self, index: int) -> None:
        return None

    def delta(self, index: int, seq: CompletionOutput) -> dict:
        return {"index": index, "text": seq.text, "finish_reason": None}

    def closing(self, index: int, seq: CompletionOutput) -> dict:
        return {"index": index, "text": "", "finish_reason": seq.finish_reason}


def test_engine_error_finish_is_an_sse_error_event() -> None:
    gen = _generation([_output("a", None)], streaming=True)

    async def run() -> list[bytes]:
        chunks = stream_chunks(gen, ChunkFramer({"id": "x"}, False), _Formatter(), False)
        out = [await anext(chunks)]
        gen.jobs[0].stream.put(_output("b", "error"))
        out += [chunk async for chunk in chunks]
        return out

    chunks = asyncio.run(run())
    assert b'"text":"a"' in chunks[0]
    assert chunks[-1] == DONE
    error = json.loads(chunks[-2][len(b"data: ") :])["error"]
    assert error["code"] == "engine_error" and error["type"] == "server_error"
    assert "Traceback" not in error["message"]
    assert gen.ctx.status == 500
    text = gen.state.metrics.render()[0].decode()
    assert 'quire:request_error_total{model_name="m"} 1.0' in text
    assert 'quire:request_success_total{finished_reason="stop",model_name="m"} 0.0' in text
    assert gen not in gen.state.live_generations


def test_engine_error_of_one_sequence_aborts_its_running_siblings() -> None:
    """n=2, sequence 0 failed in the engine while sequence 1 still runs: the HTTP request fails,
    and sequence 1 is aborted in the engine rather than left to run to its token limit."""
    gen = _generation([], streaming=True)
    job = gen.jobs[0]
    job.stream = RequestStream("req-0", 2)
    seq = CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")
    job.stream.put(RequestOutput("req-0", "hi", [1, 2], [seq], finished=False, metrics=RequestMetrics(0.0)))

    async def run() -> list[bytes]:
        chunks = stream_chunks(gen, ChunkFramer({"id": "x"}, False), _Formatter(), False)
        return [chunk async for chunk in chunks]

    chunks = asyncio.run(run())
    assert chunks[-1] == DONE and b"engine_error" in chunks[-2]
    assert gen.state.client.aborted == ["req-0"]


def test_engine_error_finish_is_a_500_response() -> None:
    gen = _generation([_output("a", "error")], streaming=False)

    async def never_disconnects() -> dict:
        await asyncio.Event().wait()
        return {}

    async def run() -> None:
        request = Request({"type": "http", "method": "POST", "headers": []}, never_disconnects)
        await collect_choices(request, gen)

    with pytest.raises(Exception) as caught:
        asyncio.run(run())
    assert getattr(caught.value, "status", None) == 500
    assert caught.value.body()["error"]["code"] == "engine_error"  # type: ignore[attr-defined]
    assert isinstance(caught.value.__context__, EngineRequestError)
