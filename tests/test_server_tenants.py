"""Tenant isolation end to end: the prefix cache is per tenant (or per cache group), request
priorities are per-tenant grants, and a tenant's chat template cannot freeze the server for the
others. The real server with a key file (and request templates trusted), the official ``openai``
client and httpx.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server_fixtures import ServerProcess, running_server

KEYS = {
    "sk-tenant-a-0123456789": {"tenant": "a", "priority": {"min": -10, "max": 10}},
    "sk-tenant-b-0123456789": "b",
    "sk-tenant-c-0123456789": {"tenant": "c", "cache_group": "partners"},
    "sk-tenant-d-0123456789": {"tenant": "d", "cache_group": "partners"},
}
# Long enough for several full KV blocks (16 tokens each), so a prefix hit is unmistakable.
SECRET_PROMPT = "the confidential merger terms of acme and globex are " + "one two three four five " * 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.json"
    key_file.write_text(json.dumps({"keys": KEYS}))
    with running_server("--api-key-file", str(key_file), "--trust-request-chat-template") as srv:
        yield srv


def _client(server: ServerProcess, tenant: str) -> openai.OpenAI:
    key = f"sk-tenant-{tenant}-0123456789"
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def _cached_tokens(server: ServerProcess, tenant: str, prompt: str, **extra: object) -> int:
    result = _client(server, tenant).completions.create(
        model="quire-demo", prompt=prompt, max_tokens=1, temperature=0.0, extra_body=extra or None
    )
    assert result.usage is not None and result.usage.prompt_tokens_details is not None
    return result.usage.prompt_tokens_details.cached_tokens or 0


def test_prefix_cache_hits_never_cross_tenants(server: ServerProcess) -> None:
    # Before: B's request hit A's cached blocks, and cached_tokens told B that A had sent this.
    assert _cached_tokens(server, "a", SECRET_PROMPT) == 0
    assert _cached_tokens(server, "b", SECRET_PROMPT) == 0
    assert _cached_tokens(server, "a", SECRET_PROMPT) >= 48  # A's own repeat still hits
    # C and D chose to share a cache group: each sees the other's prefix.
    shared = "a prompt the partners both send " + "six seven eight nine ten " * 12
    assert _cached_tokens(server, "c", shared) == 0
    assert _cached_tokens(server, "d", shared) >= 48
    assert _cached_tokens(server, "a", shared) == 0


def _rejected_invalid(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("quire:requests_rejected_total{") and 'reason="invalid"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_priority_is_a_per_tenant_grant(server: ServerProcess) -> None:
    b = _client(server, "b")
    rejected_before = _rejected_invalid(server)
    # Before: any client could send priority -1000000 and preempt every other tenant's streams.
    with pytest.raises(openai.BadRequestError) as refused:
        b.completions.create(model="quire-demo", prompt="hi", max_tokens=1, extra_body={"priority": -5})
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "priority"
    assert "[0, 2147483647]" in error["message"]
    assert _rejected_invalid(server) == rejected_before + 1  # counted like every other 400
    # Less urgent than normal is always fine.
    assert b.completions.create(model="quire-demo", prompt="hi", max_tokens=1, extra_body={"priority": 3})
    # A is granted [-10, 10].
    a = _client(server, "a")
    ok = a.chat.completions.create(
        model="quire-demo",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1,
        extra_body={"priority": -5},
    )
    assert ok.choices[0].finish_reason is not None
    with pytest.raises(openai.BadRequestError, match=r"\[-10, 10\]"):
        a.completions.create(model="quire-demo", prompt="hi", max_tokens=1, extra_body={"priority": -11})


@pytest.mark.parametrize("priority", [2**70, -(2**70), 2**63])
def test_huge_priority_is_a_400(server: ServerProcess, priority: int) -> None:
    # Before: 2**64 and above passed validation and failed serializing for the engine (a 500 that
    # leaked the request's sequences).
    with pytest.raises(openai.BadRequestError):
        _client(server, "a").completions.create(
            model="quire-demo", prompt="hi", max_tokens=1, extra_body={"priority": priority}
        )
    assert _cached_tokens(server, "b", "still serving") == 0


def _chat(server: ServerProcess, tenant: str, **extra: object) -> httpx.Response:
    body = {"model": "quire-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}
    headers = {"Authorization": f"Bearer sk-tenant-{tenant}-0123456789"}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_trusted_template_hits_its_limit_while_health_answers(server: ServerProcess) -> None:
    # Two nested loops of 10,000: before, rendered on the event loop, they froze /health for 11 s.
    nested = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}hi"
    result: dict[str, httpx.Response] = {}
    request = threading.Thread(
        target=lambda: result.update(response=_chat(server, "b", chat_template=nested))
    )
    request.start()
    worst = 0.0
    while request.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.05)
    request.join()
    response = result["response"]
    assert response.status_code == 400 and "time limit of 2 s" in response.json()["error"]["message"]
    assert worst < 1.0
    # Other limits name themselves too; a benign request template renders.
    response = _chat(server, "b", chat_template="{% for i in range(100000) %}{% endfor %}")
    assert response.status_code == 400
    assert "range() of 100000 items; the limit is 10000" in response.json()["error"]["message"]
    ok = _chat(server, "b", chat_template_kwargs={"chat_template": "{{ messages[0].content }}!"})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 0


def test_key_file_documents_the_new_fields() -> None:
    # The README's Server section and auth.py's docstring describe what the key file accepts.
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "cache_group" in readme and '"priority"' in readme
