"""Policy at the edge of the real server: auth, rate limits, backpressure, timeouts. None of it is a 500.

One server for the module: two running sequences at most and one queued, so two long streams
fill it; a 3 s request timeout, which a 4000-token request always exceeds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest

from server_fixtures import ServerProcess, running_server

MAIN_KEY = "sk-main-0123456789abcdef"
LIMITED_KEY = "sk-limited-0123456789abcdef"
TOKENS_KEY = "sk-tokens-0123456789abcdef"
CLI_KEY = "sk-cli-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    key_file = Path(tmp_path_factory.mktemp("keys")) / "keys.json"
    key_file.write_text(
        json.dumps(
            {
                "keys": {
                    MAIN_KEY: "main",
                    LIMITED_KEY: {
                        "tenant": "limited",
                        "limits": {"requests_per_minute": 60, "request_burst": 2},
                    },
                    TOKENS_KEY: {
                        "tenant": "tokens",
                        "limits": {"tokens_per_minute": 6000, "token_burst": 100},
                    },
                }
            }
        )
    )
    args = [
        "--api-key-file",
        str(key_file),
        "--api-key",
        CLI_KEY,
        "--max-num-seqs",
        "2",
        "--max-waiting",
        "1",
    ]
    # A long context, so that the streams filling the server outlast each test on any machine.
    args += ["--max-model-len", "4096", "--kv-cache-memory", "64MiB", "--request-timeout", "3"]
    with running_server(*args) as srv:
        yield srv


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _complete(server: ServerProcess, key: str | None, **body: object) -> httpx.Response:
    headers = _auth(key) if key else {}
    return httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1, **body}, headers=headers
    )


def test_auth(server: ServerProcess) -> None:
    missing = _complete(server, None)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert _complete(server, "sk-wrong-0123456789abcdef").status_code == 401
    assert (
        httpx.post(f"{server.url}/v1/completions", headers={"Authorization": "Basic abc"}).status_code == 401
    )
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}).status_code == 401
    assert _complete(server, MAIN_KEY).status_code == 200
    assert _complete(server, CLI_KEY).status_code == 200
    assert (
        httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}, headers=_auth(MAIN_KEY)).status_code == 200
    )
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-nope", max_retries=0).models.list()
    models = openai.OpenAI(base_url=f"{server.url}/v1", api_key=MAIN_KEY, max_retries=0).models.list()
    assert [m.id for m in models.data] == ["quire-demo"]
    assert server.metrics()["quire:requests_rejected_total{reason=unauthorized}"] >= 4
    assert MAIN_KEY not in server.log_text()


def test_rate_limit_429_then_refill(server: ServerProcess) -> None:
    before = server.metrics()["quire:requests_rate_limited_total"]
    assert _complete(server, LIMITED_KEY).status_code == 200
    assert _complete(server, LIMITED_KEY).status_code == 200
    limited = _complete(server, LIMITED_KEY)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert _complete(server, MAIN_KEY).status_code == 200  # other tenants are not affected
    time.sleep(1.2)  # 60 per minute: one request back every second
    assert _complete(server, LIMITED_KEY).status_code == 200
    assert server.metrics()["quire:requests_rate_limited_total"] == before + 1

    # Token buckets: the estimate is prompt + max_tokens; one that can never fit the burst is a 400.
    assert _complete(server, TOKENS_KEY, max_tokens=10).status_code == 200
    never = _complete(server, TOKENS_KEY, max_tokens=200)
    assert never.status_code == 400 and "max_tokens" in never.json()["error"]["message"]


@asynccontextmanager
async def _occupied(server: ServerProcess, count: int) -> AsyncIterator[None]:
    """``count`` long streams admitted and generating, closed (aborted) on exit."""
    client = httpx.AsyncClient(timeout=60, headers=_auth(MAIN_KEY))
    body = {"prompt": [100] * 10, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    streams, readers = [], []
    try:
        for _ in range(count):
            response = await client.send(
                client.build_request("POST", f"{server.url}/v1/completions", json=body), stream=True
            )
            assert response.status_code == 200
            streams.append(response)
        for response in streams:  # each has produced a token: admitted and running
            # Kept referenced: a line iterator that is garbage-collected closes its response.
            readers.append(response.aiter_lines())
            while not (await anext(readers[-1])).startswith("data: {"):
                pass
        yield
    finally:
        for response in streams:
            await response.aclose()
        await client.aclose()


def test_backpressure_503(server: ServerProcess) -> None:
    async def run() -> httpx.Response:
        async with _occupied(server, 2):
            # Two running, so one more may queue; a request for two sequences may not.
            async with httpx.AsyncClient(timeout=60, headers=_auth(MAIN_KEY)) as client:
                return await client.post(
                    f"{server.url}/v1/completions", json={"prompt": "x", "n": 2, "max_tokens": 1}
                )

    before = server.metrics()["quire:requests_rejected_total{reason=backpressure}"]
    rejected = asyncio.run(run())
    assert rejected.status_code == 503
    assert int(rejected.headers["retry-after"]) >= 1
    assert "capacity" in rejected.json()["error"]["message"]
    assert server.metrics()["quire:requests_rejected_total{reason=backpressure}"] == before + 1
    assert _complete(server, MAIN_KEY).status_code == 200
    # More sequences than the server ever admits at once can never succeed: a 400, not a 503.
    assert _complete(server, MAIN_KEY, n=4).status_code == 400


def test_request_timeout(server: ServerProcess) -> None:
    body = {"prompt": "x", "max_tokens": 4000, "ignore_eos": True}

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=_auth(MAIN_KEY)) as client:
            url = f"{server.url}/v1/completions"
            return await asyncio.gather(
                client.post(url, json=body), client.post(url, json={**body, "stream": True})
            )

    plain, streamed = asyncio.run(run())
    assert plain.status_code == 504 and "timeout" in plain.json()["error"]["message"]
    assert streamed.status_code == 200  # the stream had started: the error arrives as an event
    events = [e for e in streamed.text.split("\n\n") if e]
    assert "timeout" in json.loads(events[-2][len("data: ") :])["error"]["message"]
    assert events[-1] == "data: [DONE]"
    assert '"status": 504' in server.log_text()


def test_no_500s(server: ServerProcess) -> None:
    log = server.log_text()
    assert '"status": 500' not in log and "Traceback" not in log
