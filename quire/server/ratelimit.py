"""Per-tenant rate limits: requests per minute and tokens per minute, as token buckets.

Each limited tenant has up to two buckets. A bucket holds at most ``burst`` units and refills
continuously at ``per_minute / 60`` units per second, so "60 requests per minute, burst 10" lets an
idle client send 10 at once and then one per second. A request is admitted only if *both* buckets
can pay (1 request, and its token estimate = prompt tokens + ``max_tokens`` × ``n``); it then pays
both at once, and a denied request pays nothing. Because the estimate assumes every sequence runs to
``max_tokens``, the server calls :meth:`RateLimiter.refund` with the unused part when a request
finishes early.

Calling it from the server:

* ``decision.allowed`` -> go ahead. The estimate is made before tokenizing (so a limited tenant
  costs no tokenizing) and corrected with :meth:`RateLimiter.settle` once the prompt's real token
  count is known; :meth:`RateLimiter.peek` asks without taking anything.
* denied and ``decision.retryable`` -> 429 with ``Retry-After`` (:meth:`Decision.to_api_error` does it).
* denied and not retryable: the token estimate is larger than the tenant's token burst, so it can
  never pass however long the client waits. :meth:`Decision.to_api_error` makes that a **400**
  ``request_too_large``, not a 429, because the OpenAI clients retry 429 automatically and every
  retry would fail the same way; the message tells the user to lower ``max_tokens``.

Thread-safe: all bucket state is behind one lock, held only for a few arithmetic operations, so it
is safe from the event loop (where the server calls it) and from worker threads alike.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from quire.server.errors import APIError

# Float refill arithmetic can leave a bucket at 0.9999999 when the client waited exactly
# ``retry_after_s``; this slack makes "retry after exactly that long" reliably succeed.
_EPSILON = 1e-9
# Buckets are dropped once full (a full bucket is indistinguishable from a fresh one); past this
# many tenants we sweep for full ones so memory stays bounded by the number of *active* tenants.
_PRUNE_THRESHOLD = 1024


def _check_rate(name: str, value: float | None) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number (or null for no limit), got {value!r}")


def _check_burst(name: str, value: int | None, rate_name: str, rate: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if rate is None:
        raise ValueError(f"{name} is set but {rate_name} is not; a burst needs a refill rate, set both")


@dataclass(frozen=True)
class RateLimits:
    """One tenant's limits. ``None`` means unlimited.

    A burst left unset defaults to one minute's worth (the per-minute rate, at least 1), so
    "N per minute" means what it says: a client idle for a minute may send N at once.
    """

    requests_per_minute: float | None = None
    request_burst: int | None = None
    tokens_per_minute: float | None = None
    token_burst: int | None = None

    def __post_init__(self) -> None:
        _check_rate("requests_per_minute", self.requests_per_minute)
        _check_rate("tokens_per_minute", self.tokens_per_minute)
        _check_burst("request_burst", self.request_burst, "requests_per_minute", self.requests_per_minute)
        _check_burst("token_burst", self.token_burst, "tokens_per_minute", self.tokens_per_minute)

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None

    @property
    def request_capacity(self) -> float | None:
        if self.requests_per_minute is None:
            return None
        return float(self.request_burst or max(1, math.floor(self.requests_per_minute)))

    @property
    def token_capacity(self) -> float | None:
        if self.tokens_per_minute is None:
            return None
        return float(self.token_burst or max(1, math.floor(self.tokens_per_minute)))


@dataclass(frozen=True)
class Decision:
    """The answer to :meth:`RateLimiter.check`.

    ``retry_after_s`` is the exact time until both buckets hold enough (0 when allowed,
    ``math.inf`` when the request can never pass); ``reason`` is a user-facing sentence.
    """

    allowed: bool
    retry_after_s: float = 0.0
    reason: str = ""

    def __post_init__(self) -> None:
        if math.isnan(self.retry_after_s) or self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0 (or inf), got {self.retry_after_s!r}")
        if not self.allowed and not self.reason:
            raise ValueError("a denied Decision needs a reason the client can act on")

    @property
    def retryable(self) -> bool:
        """False when waiting cannot help (the estimate exceeds the bucket's capacity)."""
        return self.allowed or math.isfinite(self.retry_after_s)

    def retry_after_header(self) -> str | None:
        """``Retry-After`` value in whole seconds (rounded up), or None when allowed / not retryable."""
        if self.allowed or not self.retryable:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))

    def to_api_error(self) -> APIError:
        """The error to raise for a denied decision: 429 + Retry-After, or 400 if it can never pass."""
        if self.allowed:
            raise ValueError("to_api_error() called on an allowed Decision")
        if not self.retryable:
            return APIError(400, self.reason, param="max_tokens", code="request_too_large")
        return APIError.rate_limited(self.reason, self.retry_after_s)


class _Bucket:
    """Continuous-refill token bucket; callers hold the limiter's lock."""

    __slots__ = ("capacity", "rate_per_s", "level", "updated")

    def __init__(self, capacity: float, per_minute: float, now: float) -> None:
        self.capacity = capacity
        self.rate_per_s = per_minute / 60.0
        self.level = capacity  # a new tenant starts with a full burst
        self.updated = now

    def refill(self, now: float) -> None:
        # max(): tolerate a clock that steps backwards rather than draining the bucket.
        elapsed = max(0.0, now - self.updated)
        self.level = min(self.capacity, self.level + elapsed * self.rate_per_s)
        self.updated = max(self.updated, now)

    def wait_for(self, amount: float) -> float:
        """Seconds until ``level >= amount`` (0 if it already is)."""
        missing = amount - self.level
        return 0.0 if missing <= _EPSILON else missing / self.rate_per_s

    def take(self, amount: float) -> None:
        self.level = max(0.0, self.level - amount)

    @property
    def full(self) -> bool:
        return self.level >= self.capacity


@dataclass
class _TenantBuckets:
    limits: RateLimits
    requests: _Bucket | None
    tokens: _Bucket | None

    @property
    def full(self) -> bool:
        return all(b is None or b.full for b in (self.requests, self.tokens))


class RateLimiter:
    """Token-bucket limiter keyed by tenant name.

    ``limits_for_tenant`` is asked for a tenant's :class:`RateLimits` on every check (e.g.
    ``KeyRing.limits_for``), so changed limits take effect immediately; the tenant's buckets then
    restart full under the new limits. ``clock`` returns monotonic seconds; tests inject a fake.
    """

    def __init__(
        self,
        limits_for_tenant: Callable[[str], RateLimits],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits_for_tenant = limits_for_tenant
        self._clock = clock
        self._lock = threading.Lock()
        self._tenants: dict[str, _TenantBuckets] = {}
        self._prune_at = _PRUNE_THRESHOLD

    def check(self, tenant: str, requested_tokens: int) -> Decision:
        """Admit one request estimated at ``requested_tokens`` (prompt + max_tokens × n), or deny it.

        Allowed: 1 request and ``requested_tokens`` are taken from the tenant's buckets.
        Denied: nothing is taken.
        """
        return self._decide(tenant, requested_tokens, take=True)

    def peek(self, tenant: str, requested_tokens: int) -> Decision:
        """What ``check`` would answer now, taking nothing: lets the server refuse a request
        before costly preparation (rendering, tokenizing) whose result ``check`` then charges."""
        return self._decide(tenant, requested_tokens, take=False)

    def _decide(self, tenant: str, requested_tokens: int, take: bool) -> Decision:
        if (
            isinstance(requested_tokens, bool)
            or not isinstance(requested_tokens, int)
            or requested_tokens < 0
        ):
            raise ValueError(f"requested_tokens must be a whole number >= 0, got {requested_tokens!r}")
        limits = self._limits_for_tenant(tenant)
        if limits.unlimited:
            return Decision(True)
        token_capacity = limits.token_capacity
        if token_capacity is not None and requested_tokens > token_capacity:
            return Decision(
                False, math.inf, self._too_large_message(tenant, requested_tokens, token_capacity)
            )
        with self._lock:
            now = self._clock()
            state = self._buckets(tenant, limits, now)
            waits: list[tuple[float, str]] = []
            if state.requests is not None:
                state.requests.refill(now)
                waits.append((state.requests.wait_for(1.0), "requests"))
            if state.tokens is not None:
                state.tokens.refill(now)
                waits.append((state.tokens.wait_for(float(requested_tokens)), "tokens"))
            # Buckets refill independently and nothing is taken on denial, so both are enough
            # exactly when the slower one is: the wait is the maximum.
            wait, limit = max(waits)
            if wait > 0.0:
                return Decision(False, wait, self._denial_message(tenant, limits, limit, wait))
            if not take:
                return Decision(True)
            if state.requests is not None:
                state.requests.take(1.0)
            if state.tokens is not None:
                state.tokens.take(float(requested_tokens))
            return Decision(True)

    def refund(self, tenant: str, tokens: int) -> None:
        """Give back ``tokens`` of an admitted request's estimate it did not use (capped at the burst)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"refund tokens must be a whole number >= 0, got {tokens!r}")
        with self._lock:
            state = self._tenants.get(tenant)
            # No state means unlimited or pruned-while-full; a refund would be capped to full anyway.
            if state is None or state.tokens is None or tokens == 0:
                return
            state.tokens.refill(self._clock())
            state.tokens.level = min(state.tokens.capacity, state.tokens.level + tokens)

    def settle(self, tenant: str, charged: int, actual: int) -> Decision:
        """Correct an admitted request's charge from the estimate ``charged`` (made before the
        prompt was tokenized, so that a limited tenant costs no tokenizing) to ``actual``.

        Less: the difference is refunded. More: it is taken even below zero, since the tenant did
        send those tokens; the debt delays its next request. Denied, with the ``charged`` tokens
        given back, only when ``actual`` exceeds the tenant's burst: it can never be admitted.
        """
        for name, value in (("charged", charged), ("actual", actual)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} tokens must be a whole number >= 0, got {value!r}")
        limits = self._limits_for_tenant(tenant)
        capacity = limits.token_capacity
        if capacity is not None and actual > capacity:
            self.refund(tenant, charged)
            return Decision(False, math.inf, self._too_large_message(tenant, actual, capacity))
        if actual < charged:
            self.refund(tenant, charged - actual)
        elif actual > charged:
            with self._lock:
                state = self._tenants.get(tenant)
                if state is not None and state.tokens is not None:
                    state.tokens.refill(self._clock())
                    state.tokens.level -= actual - charged
        return Decision(True)

    @staticmethod
    def _too_large_message(tenant: str, requested: int, capacity: float) -> str:
        return (
            f"This request needs up to {requested} tokens (prompt + max_tokens), more than the "
            f"{int(capacity)}-token burst allowed for tenant '{tenant}'; it can never be admitted. "
            "Lower max_tokens or shorten the prompt."
        )

    def _buckets(self, tenant: str, limits: RateLimits, now: float) -> _TenantBuckets:
        state = self._tenants.get(tenant)
        if state is not None and state.limits == limits:
            return state
        if len(self._tenants) >= self._prune_at:
            self._prune(now)
            # Doubling keeps the sweep amortised O(1) per new tenant even if few buckets are full.
            self._prune_at = max(_PRUNE_THRESHOLD, 2 * len(self._tenants))
        state = _TenantBuckets(
            limits,
            None
            if limits.request_capacity is None
            else _Bucket(limits.request_capacity, limits.requests_per_minute or 0, now),
            None
            if limits.token_capacity is None
            else _Bucket(limits.token_capacity, limits.tokens_per_minute or 0, now),
        )
        self._tenants[tenant] = state
        return state

    def _prune(self, now: float) -> None:
        for name in list(self._tenants):
            state = self._tenants[name]
            for bucket in (state.requests, state.tokens):
                if bucket is not None:
                    bucket.refill(now)
            if state.full:
                del self._tenants[name]

    @staticmethod
    def _denial_message(tenant: str, limits: RateLimits, limit: str, wait: float) -> str:
        if limit == "requests":
            what = f"{limits.requests_per_minute:g} requests per minute"
        else:
            what = f"{limits.tokens_per_minute:g} tokens per minute (prompt + max_tokens)"
        # Whole seconds once it is long enough not to matter; never "1.23e+03s".
        shown = (
            f"{math.ceil(wait)}s" if wait >= 10 else f"{max(wait, 0.01):.2f}".rstrip("0").rstrip(".") + "s"
        )
        return f"Rate limit reached for tenant '{tenant}' on {what}. Please try again in {shown}."
