"""Unit tests for the server's policy modules: auth, rate limits, metrics, errors, request logs.

No model, no network, no sleeping: the rate limiter runs on a fake clock.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from quire.server.auth import (
    ANONYMOUS_TENANT,
    PRIORITY_BOUND,
    KeyFileError,
    KeyRing,
    PriorityGrant,
    Tenant,
    load_key_file,
)
from quire.server.errors import APIError, ErrorBody, openai_error, retry_after_header
from quire.server.metrics import ServerMetrics
from quire.server.ratelimit import Decision, RateLimiter, RateLimits
from quire.server.request_log import RequestLogger, RequestLogRecord, new_request_id, resolve_request_id

# ---------------------------------------------------------------------------------------------
# auth


def write_json(tmp_path: Path, data: object, name: str = "keys.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


SECRET = "sk-acme-0123456789abcdef"


def test_key_file_parses_tenants_and_merges_limits(tmp_path: Path) -> None:
    path = write_json(
        tmp_path,
        {
            "default_limits": {"requests_per_minute": 60, "request_burst": 10, "tokens_per_minute": 1000},
            "keys": {
                SECRET: {"tenant": "acme", "limits": {"requests_per_minute": 600, "request_burst": 50}},
                "sk-acme-second-key-xx": {
                    "tenant": "acme",
                    "limits": {"requests_per_minute": 600, "request_burst": 50},
                },
                "sk-bob-0123456789abcd": {"tenant": "bob"},
                "sk-carol-0123456789ab": "carol",
                "sk-dave-0123456789abc": {"tenant": "dave", "limits": {"tokens_per_minute": None}},
            },
        },
    )
    tenants = load_key_file(path)
    assert tenants[SECRET] == Tenant("acme", RateLimits(600, 50, 1000, None))
    assert tenants[SECRET] is tenants["sk-acme-second-key-xx"]
    assert tenants["sk-bob-0123456789abcd"].limits == RateLimits(60, 10, 1000, None)
    assert tenants["sk-carol-0123456789ab"].name == "carol"
    assert tenants["sk-dave-0123456789abc"].limits == RateLimits(60, 10, None, None)
    ring = KeyRing.from_sources(api_key_file=path)
    assert ring.enabled and len(ring) == 5
    assert ring.limits_for("acme").requests_per_minute == 600
    assert ring.limits_for("nobody") == RateLimits()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "top level must be an object"),
        ({"keys": {}}, '"keys" must be a non-empty object'),
        ({"keys": {SECRET: "acme"}, "kyes": {}}, "unknown field(s) 'kyes'"),
        (
            {"keys": {SECRET: {"tenant": "acme", "limit": {}}}},
            "keys entry #1 (sk-a…): unknown field(s) 'limit'",
        ),
        ({"keys": {SECRET: {"tenant": "bad name!"}}}, "keys entry #1 (sk-a…): tenant must be"),
        ({"keys": {SECRET: {}}}, "tenant must be"),
        ({"keys": {SECRET: 5}}, "must be a tenant name or an object"),
        ({"keys": {"sk bad key with spaces": "x"}}, "printable ASCII"),
        (
            {"keys": {SECRET: {"tenant": "acme", "limits": {"requests_per_minute": -1}}}},
            "limits: requests_per_minute must be a positive number",
        ),
        (
            {"keys": {SECRET: {"tenant": "acme", "limits": {"request_burst": 3}}}},
            "request_burst is set but requests_per_minute is not",
        ),
        (
            {"default_limits": {"token_burst": 1.5, "tokens_per_minute": 10}, "keys": {SECRET: "a"}},
            "token_burst",
        ),
        ({"default_limits": {"requests_per_min": 1}, "keys": {SECRET: "a"}}, "default_limits: unknown field"),
        (
            {
                "keys": {
                    SECRET: {"tenant": "acme"},
                    "sk-other-0123456789ab": {"tenant": "acme", "limits": {"requests_per_minute": 5}},
                }
            },
            "keys entry #2 (sk-o…): tenant 'acme' gets limits, priority or cache_group different from keys entry #1",
        ),
        (
            {"keys": {SECRET: {"tenant": "acme", "priority": {"min": -5}}, "sk-other-0123456789ab": "acme"}},
            "keys entry #2 (sk-o…): tenant 'acme' gets limits, priority or cache_group different",
        ),
        ({"keys": {SECRET: {"tenant": "acme", "priority": {"min": 1, "max": 5}}}}, "must include 0"),
        (
            {"keys": {SECRET: {"tenant": "acme", "priority": {"min": -1.5}}}},
            "priority: priority min must be an integer",
        ),
        (
            {"keys": {SECRET: {"tenant": "acme", "priority": {"max": 2**40}}}},
            "priority max must be an integer in",
        ),
        ({"keys": {SECRET: {"tenant": "acme", "priority": {"lo": -1}}}}, "priority: unknown field(s) 'lo'"),
        (
            {"keys": {SECRET: {"tenant": "acme", "priority": [-1, 1]}}},
            'priority: must be an object like {"min"',
        ),
        ({"keys": {SECRET: {"tenant": "acme", "cache_group": "no spaces"}}}, "cache_group must be 1-64"),
        ('{"keys": {"sk-dup-0123456789abcd": "a", "sk-dup-0123456789abcd": "b"}}', "sk-d… appears twice"),
    ],
)
def test_key_file_errors_name_file_and_entry(tmp_path: Path, content: object, expected: str) -> None:
    path = write_json(tmp_path, content)
    with pytest.raises(KeyFileError) as info:
        load_key_file(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message
    assert SECRET not in message  # keys are never shown in full


def test_key_file_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key_file(tmp_path / "absent.json")


def test_cli_keys_share_default_tenant_and_duplicates_rejected(tmp_path: Path) -> None:
    ring = KeyRing.from_sources(["sk-old-key-0000000000", "sk-new-key-0000000000"])
    old = ring.authenticate("Bearer sk-old-key-0000000000")
    new = ring.authenticate("Bearer sk-new-key-0000000000")
    assert old is not None and new is not None and old.name == new.name == "default"
    path = write_json(tmp_path, {"keys": {SECRET: "acme"}})
    with pytest.raises(ValueError, match="given twice") as info:
        KeyRing.from_sources([SECRET], path)
    assert SECRET not in str(info.value)
    both = KeyRing.from_sources(["sk-cli-key-0000000000"], path)
    assert both.authenticate(f"Bearer {SECRET}") == Tenant("acme")
    assert both.authenticate("Bearer sk-cli-key-0000000000") == Tenant("default")


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", f"Basic {SECRET}", f"Token {SECRET}", "Bearer sk-wrong", f"Bearer {SECRET}x",
     f"Bearer {SECRET} extra", SECRET],
)  # fmt: skip
def test_auth_rejects(header: str | None) -> None:
    ring = KeyRing({SECRET: Tenant("acme"), "sk-other-0123456789ab": Tenant("other")})
    assert ring.authenticate(header) is None
    with pytest.raises(APIError) as info:
        ring.require(header)
    assert info.value.status == 401
    assert info.value.code == "invalid_api_key"
    assert info.value.headers["WWW-Authenticate"] == "Bearer"


def test_auth_accepts_and_maps_tenant() -> None:
    ring = KeyRing({SECRET: Tenant("acme"), "sk-other-0123456789ab": Tenant("other")})
    assert ring.authenticate(f"Bearer {SECRET}") == Tenant("acme")
    assert ring.authenticate(f"bearer   {SECRET}  ") == Tenant("acme")  # scheme is case-insensitive
    assert ring.require("Bearer sk-other-0123456789ab").name == "other"
    missing = pytest.raises(APIError, match="didn't provide")
    with missing:
        ring.require(None)
    with pytest.raises(APIError, match="Incorrect API key"):
        ring.require("Bearer nope")
    assert SECRET not in repr(ring)


def test_auth_disabled_without_keys() -> None:
    ring = KeyRing.from_sources(default_limits=RateLimits(requests_per_minute=5))
    assert not ring.enabled
    for header in (None, "Bearer anything", "garbage"):
        tenant = ring.authenticate(header)
        assert tenant is not None and tenant.name == ANONYMOUS_TENANT
    assert ring.limits_for(ANONYMOUS_TENANT).requests_per_minute == 5


def test_priority_grants_and_cache_groups_from_the_key_file(tmp_path: Path) -> None:
    path = write_json(
        tmp_path,
        {
            "keys": {
                SECRET: {"tenant": "acme", "priority": {"min": -10, "max": 10}},
                "sk-bob-0123456789abcd": {"tenant": "bob", "cache_group": "partners"},
                "sk-carol-0123456789ab": {"tenant": "carol", "cache_group": "partners"},
                "sk-dave-0123456789abc": "dave",
            }
        },
    )
    ring = KeyRing.from_sources(["sk-cli-key-0000000000"], path)
    keys = (SECRET, "sk-bob-0123456789abcd", "sk-carol-0123456789ab", "sk-dave-0123456789abc")
    acme, bob, carol, dave = (ring.require(f"Bearer {key}") for key in keys)
    cli = ring.require("Bearer sk-cli-key-0000000000")
    assert acme.priority == PriorityGrant(-10, 10)
    acme.priority.check(-5)
    # Every tenant without a grant of its own: nothing more urgent than the normal level 0.
    for tenant in (bob, dave, cli, KeyRing().anonymous):
        assert tenant.priority == PriorityGrant(0, PRIORITY_BOUND)
        with pytest.raises(APIError, match=r"priority -5 is outside .* \[0, 2147483647\]") as info:
            tenant.priority.check(-5)
        assert info.value.status == 400 and info.value.param == "priority"
        with pytest.raises(APIError, match="priority 118059162071..."):
            tenant.priority.check(2**70)
    # One prefix-cache salt per tenant, shared only inside a cache group; all the same length, so
    # no salted block of one tenant can hash like another's.
    salts = {t.name: t.cache_salt for t in (acme, bob, carol, dave, cli, KeyRing().anonymous)}
    assert salts["bob"] == salts["carol"]
    assert len(set(salts.values())) == 5 and {len(s) for s in salts.values()} == {32}
    assert Tenant("partners").cache_salt != salts["bob"]  # a group is not the tenant of that name


# ---------------------------------------------------------------------------------------------
# rate limiting


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(limits: RateLimits) -> tuple[RateLimiter, FakeClock]:
    clock = FakeClock()
    return RateLimiter(lambda tenant: limits, clock=clock), clock


def test_request_burst_then_deny_with_exact_retry_after() -> None:
    rl, clock = limiter(RateLimits(requests_per_minute=60, request_burst=3))
    assert [rl.check("t", 0).allowed for _ in range(3)] == [True, True, True]
    denied = rl.check("t", 0)
    assert not denied.allowed and denied.retryable
    assert denied.retry_after_s == pytest.approx(1.0)
    assert "60 requests per minute" in denied.reason
    assert denied.retry_after_header() == "1"
    clock.advance(0.5)
    half = rl.check("t", 0)
    assert not half.allowed and half.retry_after_s == pytest.approx(0.5)  # the denial took nothing
    clock.advance(0.5)
    assert rl.check("t", 0).allowed  # exactly retry_after later
    assert not rl.check("t", 0).allowed


def test_refill_is_continuous_and_capped() -> None:
    rl, clock = limiter(RateLimits(requests_per_minute=6, request_burst=2))  # one per 10 s
    assert rl.check("t", 0).allowed and rl.check("t", 0).allowed
    clock.advance(25.0)  # 2.5 requests' worth, capped at the burst of 2
    assert rl.check("t", 0).allowed and rl.check("t", 0).allowed
    d = rl.check("t", 0)
    assert not d.allowed and d.retry_after_s == pytest.approx(10.0)
    clock.advance(1000.0)
    assert [rl.check("t", 0).allowed for _ in range(3)] == [True, True, False]


def test_default_burst_is_one_minute_of_rate() -> None:
    rl, _ = limiter(RateLimits(requests_per_minute=5))
    assert [rl.check("t", 0).allowed for _ in range(6)] == [True] * 5 + [False]


def test_token_limit_refund_and_tenants_are_independent() -> None:
    rl, clock = limiter(RateLimits(tokens_per_minute=600, token_burst=1000))  # 10 tokens/s
    assert rl.check("a", 800).allowed
    d = rl.check("a", 500)
    assert not d.allowed and d.retry_after_s == pytest.approx(30.0)  # needs 300 more at 10/s
    assert "tokens per minute" in d.reason
    assert rl.check("b", 1000).allowed  # another tenant has its own bucket
    rl.refund("a", 300)  # the first request stopped early
    assert rl.check("a", 500).allowed
    rl.refund("a", 10_000)  # refunds cap at the burst
    assert rl.check("a", 1000).allowed
    assert not rl.check("a", 1).allowed
    clock.advance(0.1)
    assert rl.check("a", 1).allowed
    with pytest.raises(ValueError):
        rl.refund("a", -1)


def test_denied_request_takes_from_neither_bucket() -> None:
    # Requests refill at 0.01/s (so barely at all here), tokens at 1/s.
    limits = RateLimits(requests_per_minute=0.6, request_burst=2, tokens_per_minute=60, token_burst=10)
    rl, clock = limiter(limits)
    assert rl.check("t", 10).allowed  # requests 2 -> 1, tokens 10 -> 0
    d = rl.check("t", 5)  # a request is available, tokens are not: wait 5 s for 5 tokens
    assert not d.allowed and d.retry_after_s == pytest.approx(5.0) and "tokens" in d.reason
    clock.advance(5.0)
    # Had the denial taken its request, only 0.05 requests would be left and this would fail.
    assert rl.check("t", 5).allowed
    d = rl.check("t", 0)
    assert not d.allowed and "requests per minute" in d.reason
    assert d.retry_after_s == pytest.approx(95.0)  # (1 - 0.05) / 0.01


def test_oversized_request_is_never_admitted() -> None:
    rl, clock = limiter(RateLimits(tokens_per_minute=100_000, token_burst=20_000))
    d = rl.check("acme", 20_001)
    assert not d.allowed and not d.retryable and math.isinf(d.retry_after_s)
    assert "20000-token burst" in d.reason and "max_tokens" in d.reason
    assert d.retry_after_header() is None
    err = d.to_api_error()
    assert err.status == 400 and err.code == "request_too_large" and "Retry-After" not in err.headers
    clock.advance(3600)
    assert not rl.check("acme", 20_001).allowed
    assert rl.check("acme", 20_000).allowed


def test_decision_to_api_error_429() -> None:
    err = Decision(False, 2.2, "slow down").to_api_error()
    assert err.status == 429 and err.headers == {"Retry-After": "3"} and err.code == "rate_limit_exceeded"
    with pytest.raises(ValueError):
        Decision(True).to_api_error()


def test_unlimited_and_limit_changes() -> None:
    current = {"limits": RateLimits()}
    clock = FakeClock()
    rl = RateLimiter(lambda t: current["limits"], clock=clock)
    assert all(rl.check("t", 10**9).allowed for _ in range(100))
    current["limits"] = RateLimits(requests_per_minute=1)
    assert rl.check("t", 0).allowed and not rl.check("t", 0).allowed


@pytest.mark.parametrize(
    "kwargs",
    [{"requests_per_minute": 0}, {"tokens_per_minute": -5}, {"request_burst": 2}, {"requests_per_minute": 1,
     "request_burst": 0}, {"tokens_per_minute": float("nan")}, {"requests_per_minute": True}],
)  # fmt: skip
def test_rate_limits_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RateLimits(**kwargs)  # type: ignore[arg-type]


def test_check_validates_tokens() -> None:
    rl, _ = limiter(RateLimits(requests_per_minute=1))
    with pytest.raises(ValueError):
        rl.check("t", -1)


# ---------------------------------------------------------------------------------------------
# metrics


@dataclass
class Stats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_prompt_tokens: int
    num_generation_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int = 0


@dataclass
class Timings:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def test_metrics_step_counters_and_gauges() -> None:
    m = ServerMetrics(model_name="tiny")
    m.observe_step(Stats(3, 2, 0.25, 100, 3, 64, 16, num_preemptions=1))
    m.observe_step(Stats(4, 0, 0.5, 0, 4, 96, 48))
    s = samples(m)
    assert s[("quire:num_requests_running", ())] == 4
    assert s[("quire:num_requests_waiting", ())] == 0
    assert s[("quire:kv_cache_usage_perc", ())] == 0.5
    assert s[("quire:prompt_tokens_total", ())] == 100
    assert s[("quire:generation_tokens_total", ())] == 7
    assert s[("quire:prefix_cache_queries_total", ())] == 96  # cumulative totals, not summed
    assert s[("quire:prefix_cache_hits_total", ())] == 48
    assert s[("quire:num_preemptions_total", ())] == 1
    m.observe_step(Stats(0, 0, 0.0, 0, 0, 10, 5))  # engine restarted: totals went down
    s = samples(m)
    assert s[("quire:prefix_cache_queries_total", ())] == 106
    assert s[("quire:prefix_cache_hits_total", ())] == 53


def test_metrics_request_finished_and_rejections() -> None:
    m = ServerMetrics(model_name="tiny")
    t = Timings(
        10.0, first_scheduled_time=10.5, first_token_time=11.0, last_token_time=13.0, finished_time=13.5
    )
    m.observe_request_finished("stop", t, num_generation_tokens=5, num_prompt_tokens=7)
    m.observe_request_finished("abort", Timings(20.0, finished_time=20.1), num_generation_tokens=0)
    m.inc_rate_limited()
    m.inc_rate_limited()
    m.inc_rejected("backpressure")
    m.inc_rejected("payload_too_large")
    s = samples(m)
    assert s[("quire:request_success_total", (("finished_reason", "stop"),))] == 1
    # Aborts and errors are not successes (as vLLM): each has its own counter.
    assert ("quire:request_success_total", (("finished_reason", "abort"),)) not in s
    assert s[("quire:request_aborted_total", ())] == 1
    assert s[("quire:request_error_total", ())] == 0
    assert s[("quire:request_success_total", (("finished_reason", "length"),))] == 0  # pre-created
    assert s[("quire:requests_rate_limited_total", ())] == 2
    assert s[("quire:requests_rejected_total", (("reason", "backpressure"),))] == 1
    assert s[("quire:requests_rejected_total", (("reason", "payload_too_large"),))] == 1
    assert s[("quire:requests_rejected_total", (("reason", "too_long"),))] == 0
    assert s[("quire:time_to_first_token_seconds_count", ())] == 1
    assert s[("quire:time_to_first_token_seconds_sum", ())] == pytest.approx(1.0)
    assert s[("quire:request_queue_time_seconds_sum", ())] == pytest.approx(0.5)
    assert s[("quire:request_prefill_time_seconds_sum", ())] == pytest.approx(0.5)
    assert s[("quire:e2e_request_latency_seconds_count", ())] == 2
    assert s[("quire:e2e_request_latency_seconds_sum", ())] == pytest.approx(3.6)
    # 5 tokens over 2 s of decode: 4 gaps of 0.5 s.
    assert s[("quire:inter_token_latency_seconds_count", ())] == 4
    assert s[("quire:inter_token_latency_seconds_sum", ())] == pytest.approx(2.0)
    assert s[("quire:inter_token_latency_seconds_bucket", (("le", "0.5"),))] == 4
    assert s[("quire:inter_token_latency_seconds_bucket", (("le", "0.4"),))] == 0
    assert s[("quire:request_prompt_tokens_sum", ())] == 7


def test_metrics_streaming_itl_and_label_validation() -> None:
    m = ServerMetrics()
    m.observe_token_gap(0.01)
    m.observe_token_gap(0.06, count=3)
    t = Timings(0.0, 0.0, 0.1, 0.2, 0.2)
    m.observe_request_finished("length", t, num_generation_tokens=5, record_itl=False)
    s = samples(m)
    assert s[("quire:inter_token_latency_seconds_count", ())] == 4
    assert s[("quire:inter_token_latency_seconds_sum", ())] == pytest.approx(0.07)
    with pytest.raises(ValueError, match="label"):
        m.inc_rejected("Bad Reason")
    with pytest.raises(ValueError):
        m.observe_request_finished("a user's string", t, 1)


def test_metrics_registries_are_per_instance() -> None:
    a, b = ServerMetrics(), ServerMetrics()  # would raise "Duplicated timeseries" on a shared registry
    a.inc_rate_limited()
    assert samples(a)[("quire:requests_rate_limited_total", ())] == 1
    assert samples(b)[("quire:requests_rate_limited_total", ())] == 0


# ---------------------------------------------------------------------------------------------
# errors


def test_openai_error_shapes() -> None:
    assert openai_error(400, "bad", param="max_tokens") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "max_tokens", "code": None}
    }
    assert openai_error(401, "no")["error"] == {
        "message": "no",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert openai_error(429, "slow")["error"]["code"] == "rate_limit_exceeded"
    assert openai_error(503, "busy")["error"]["type"] == "service_unavailable"
    assert openai_error(500, "x")["error"]["type"] == "server_error"
    assert openai_error(418, "x", type_="teapot", code="c")["error"] == {
        "message": "x",
        "type": "teapot",
        "param": None,
        "code": "c",
    }
    with pytest.raises(ValueError):
        openai_error(200, "ok")
    with pytest.raises(ValueError):
        ErrorBody("", "t")


def test_api_error_constructors() -> None:
    nf = APIError.model_not_found("gpt-9")
    assert nf.status == 404 and nf.body()["error"]["code"] == "model_not_found" and "gpt-9" in nf.message
    rl = APIError.rate_limited("slow", retry_after_s=0.2)
    assert rl.status == 429 and rl.headers == {"Retry-After": "1"}
    busy = APIError.overloaded("queue full", retry_after_s=4.5)
    assert busy.status == 503 and busy.headers["Retry-After"] == "5"
    assert APIError.payload_too_large("big").body()["error"]["code"] == "request_too_large"
    assert APIError.invalid_request("bad n", param="n").body()["error"]["param"] == "n"
    assert retry_after_header(0) == "1" and retry_after_header(2.0) == "2" and retry_after_header(2.01) == "3"
    with pytest.raises(ValueError):
        retry_after_header(math.inf)


# ---------------------------------------------------------------------------------------------
# request ids and logs


@pytest.mark.parametrize("value", ["abc-123", "x" * 128, "a.b_c:d/e=f"])
def test_request_id_accepted(value: str) -> None:
    assert resolve_request_id(value) == value


@pytest.mark.parametrize(
    "value", [None, "", "x" * 129, "has space", "line\nbreak", "tab\t", "é", "ok\n", "\x00"]
)
def test_request_id_replaced(value: str | None) -> None:
    rid = resolve_request_id(value)
    assert rid != value and rid.startswith("req-") and len(rid) == 36
    assert resolve_request_id(value, prefix="chatcmpl").startswith("chatcmpl-")
    assert new_request_id() != new_request_id()


def make_record() -> RequestLogRecord:
    t = Timings(5.0, first_scheduled_time=5.001, first_token_time=5.05, finished_time=5.5)
    return RequestLogRecord(
        request_id="req-1",
        tenant="acme",
        model="tiny",
        status=200,
        prompt_tokens=12,
        completion_tokens=40,
        finish_reason="stop",
        endpoint="/v1/completions",
        stream=False,
        **RequestLogRecord.timings_ms(t),
    )


def test_log_line_has_no_text_by_default(caplog: pytest.LogCaptureFixture) -> None:
    logger = RequestLogger()
    with caplog.at_level(logging.INFO, logger="quire.requests"):
        logger.log(make_record(), prompt="MY SECRET PROMPT", completion="MY SECRET ANSWER")
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "SECRET" not in line and "\n" not in line
    fields = json.loads(line)
    assert fields["request_id"] == "req-1" and fields["tenant"] == "acme" and fields["status"] == 200
    assert (
        fields["prompt_tokens"] == 12
        and fields["completion_tokens"] == 40
        and fields["finish_reason"] == "stop"
    )
    assert fields["queue_ms"] == pytest.approx(1.0) and fields["ttft_ms"] == pytest.approx(50.0)
    assert fields["e2e_ms"] == pytest.approx(500.0)
    assert "prompt" not in fields and "completion" not in fields
    assert caplog.records[0].quire_request["model"] == "tiny"  # type: ignore[attr-defined]


def test_log_prompts_opt_in_truncates() -> None:
    logger = RequestLogger(log_prompts=True, max_text_chars=10)
    fields = json.loads(
        logger.format(make_record(), prompt=[{"role": "user", "content": "hello there"}], completion="short")
    )
    assert fields["completion"] == "short"
    assert fields["prompt"].startswith('[{"role": ') and fields["prompt"].endswith("chars]")
    assert len(fields["prompt"]) < 30


def test_log_record_validation_and_missing_timings() -> None:
    with pytest.raises(ValueError):
        RequestLogRecord("r", "t", "m", status=42)
    assert RequestLogRecord.timings_ms(None) == {"queue_ms": None, "ttft_ms": None, "e2e_ms": None}
    assert RequestLogRecord.timings_ms(Timings(1.0), now=1.25)["e2e_ms"] == pytest.approx(250.0)


def test_idle_tenants_are_forgotten() -> None:
    rl, clock = limiter(RateLimits(requests_per_minute=60, request_burst=1))
    for i in range(1000):
        assert rl.check(f"old{i}", 0).allowed
    clock.advance(2.0)  # the old buckets are full again, indistinguishable from fresh ones
    for i in range(100):
        assert rl.check(f"new{i}", 0).allowed
    assert len(rl._tenants) < 200
    assert not rl.check("new99", 0).allowed  # active tenants keep their state
    assert rl.check("old0", 0).allowed
