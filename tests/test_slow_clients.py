"""Slow and stalled clients, with raw sockets against the real server.

Headers must arrive within ``--header-timeout`` (else the connection is closed without a
response), a body within ``--body-timeout`` (else a 408 in OpenAI's format, then the connection is
closed); normal requests are served meanwhile, and stalled connections never hold up SIGTERM
beyond the shutdown timeout.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from server_fixtures import ServerProcess, running_server

HALF_HEADERS = b"POST /v1/completions HTTP/1.1\r\nHost: quire\r\nContent-Type: appl"
BODY = json.dumps({"prompt": "hello", "max_tokens": 2}).encode()
HALF_BODY = (
    b"POST /v1/completions HTTP/1.1\r\nHost: quire\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY[:10]
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server("--header-timeout", "1", "--body-timeout", "1") as server:
        yield server


def _connect(server: ServerProcess, payload: bytes) -> socket.socket:
    parts = urlsplit(server.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    if payload:
        sock.sendall(payload)
    return sock


def _read_until_closed(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data, time.monotonic() - started
        data += chunk


def _completion_works(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert response.status_code == 200


def test_stalled_headers_are_closed(server: ServerProcess) -> None:
    half = _connect(server, HALF_HEADERS)
    silent = _connect(server, b"")  # connects and never says anything
    _completion_works(server)  # others are served while they stall
    for sock in (half, silent):
        with sock:
            data, seconds = _read_until_closed(sock)
            assert data == b"" and seconds < 8


def test_stalled_body_gets_408_then_close(server: ServerProcess) -> None:
    with _connect(server, HALF_BODY) as sock:
        _completion_works(server)
        data, seconds = _read_until_closed(sock)
    assert seconds < 8
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert "body" in error["message"] and error["type"] and error["code"] == "timeout"
    _completion_works(server)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'quire:requests_rejected_total{model_name="quire-demo",reason="body_timeout"} 1.0' in metrics, [
        line for line in metrics.splitlines() if "rejected" in line
    ]


def test_complete_requests_on_a_raw_socket_still_work(server: ServerProcess) -> None:
    # Sent in pieces, each well inside the timeouts: slow is fine, stalled is not.
    with _connect(server, HALF_HEADERS) as sock:
        time.sleep(0.3)
        rest = (
            b"ication/json\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(rest + BODY[:10])
        time.sleep(0.3)
        sock.sendall(BODY[10:])
        data, _ = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_sigterm_with_stalled_connections_exits_promptly() -> None:
    # Long timeouts: only the drain itself may cut these connections short. Requests still sending
    # their body have started no work, so the drain answers them 503 at once instead of waiting
    # for them (they used to hold it for the whole --shutdown-timeout); half-sent headers and
    # idle keep-alive connections are simply closed.
    with running_server(
        "--header-timeout", "60", "--body-timeout", "60", "--shutdown-timeout", "60"
    ) as server:
        half_headers = [_connect(server, HALF_HEADERS) for _ in range(10)]
        half_bodies = [_connect(server, HALF_BODY) for _ in range(10)]
        with httpx.Client(timeout=30) as client:  # and two idle keep-alive connections
            for _ in range(2):
                assert client.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
            _completion_works(server)
            time.sleep(0.5)  # the server has read every stalled request's first bytes
            server.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert server.proc.wait(60) == 0
            assert time.monotonic() - started < 10, "stalled connections held up the shutdown"
        for sock in half_bodies:
            with sock:
                data, _ = _read_until_closed(sock)
                assert data.startswith(b"HTTP/1.1 503"), data[:200]
        for sock in half_headers:
            sock.close()
        assert "Traceback" not in server.log_text()
