"""deploy/nginx/quire.conf holds the directives a streaming, failing-over proxy needs.

The slow nginx test (tests/test_nginx_rolling.py) shows tokens streaming through real nginx, but it
cannot catch ``proxy_buffering on``: quire's SSE responses send ``X-Accel-Buffering: no``, which
nginx obeys per response, so they stream either way. Clients of the non-streaming routes and
other proxies still rely on the config, so its directives are checked here, without nginx.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "deploy" / "nginx" / "quire.conf"
SCRIPT = REPO / "deploy" / "rolling_restart.sh"


def _directives(text: str) -> list[str]:
    """Each directive of an nginx config (comments dropped), whitespace collapsed."""
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return [" ".join(part.split()) for part in re.split(r"[;{}]", code) if part.strip()]


def test_nginx_conf_streams_balances_and_fails_over() -> None:
    directives = _directives(CONF.read_text())
    for required in (
        "least_conn",
        "proxy_buffering off",
        "proxy_http_version 1.1",
        'proxy_set_header Connection ""',
    ):
        assert required in directives, required
    assert any(re.fullmatch(r"keepalive \d+", d) for d in directives)
    (read_timeout,) = [d for d in directives if d.startswith("proxy_read_timeout ")]
    assert int(read_timeout.split()[1].rstrip("s")) >= 600  # long generations are not cut
    (next_upstream,) = [d for d in directives if d.startswith("proxy_next_upstream ")]
    assert {"error", "timeout", "http_503"} <= set(next_upstream.split()[1:])


def test_rolling_restart_writes_health_checked_upstreams() -> None:
    # The upstream servers are written by the script (one line per replica), with passive checks.
    assert re.search(r"'server %s:%s max_fails=\d+ fail_timeout=\d+s;", SCRIPT.read_text())
