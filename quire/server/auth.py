"""API keys: which tenant a request belongs to, and that tenant's rate limits.

Keys come from repeatable ``--api-key KEY`` flags and/or one ``--api-key-file PATH``. With no keys
at all, authentication is off and every request is the ``anonymous`` tenant.

Every ``--api-key`` belongs to the tenant ``default``. Both ``anonymous`` and ``default`` have
the default limits and priority grant and a prefix cache of their own. Several flag keys are almost always one
client's old and new key during a rotation, so they share one tenant and one rate-limit budget;
give keys separate tenants with the key file.

Key file format (JSON)::

    {
      "default_limits": {"requests_per_minute": 60, "request_burst": 10,
                         "tokens_per_minute": 100000, "token_burst": 20000},
      "keys": {
        "sk-acme-1": {"tenant": "acme", "limits": {"requests_per_minute": 600},
                      "priority": {"min": -10, "max": 10}},
        "sk-acme-2": {"tenant": "acme", "limits": {"requests_per_minute": 600},
                      "priority": {"min": -10, "max": 10}},
        "sk-bob":    {"tenant": "bob", "cache_group": "partners"},
        "sk-dan":    {"tenant": "dan", "cache_group": "partners"},
        "sk-carol":  "carol"
      }
    }

* ``keys`` (required, non-empty): key -> ``{"tenant": NAME, "limits": {...}, "priority": {...},
  "cache_group": NAME}`` (all but ``tenant`` optional), or just ``NAME``.
* ``default_limits`` (optional): limits for every key without its own. A key's ``limits`` override
  the defaults field by field; ``null`` removes a limit. Fields: ``requests_per_minute``,
  ``request_burst``, ``tokens_per_minute``, ``token_burst`` (see ``ratelimit.RateLimits``).
* ``priority`` (optional): the range of the request field ``priority`` the tenant may use,
  ``{"min": M, "max": N}``. Lower values are more urgent: the scheduler serves them first and
  preempts less urgent requests for them. The default grant is ``[0, 2**31 - 1]``: nothing more
  urgent than the normal level 0, which requests without a ``priority`` get, so a grant must
  include 0. A request outside its tenant's range is refused (400, naming the range), never
  clamped: a client that asked for urgency should learn it did not get it.
* ``cache_group`` (optional): prefix-cache sharing. Each tenant's prompts are cached apart from
  every other tenant's (the cache key is salted per tenant), because a cache hit is visible
  (``usage.prompt_tokens_details.cached_tokens``, and in latency) and would tell one tenant what
  another recently sent. Tenants with the same ``cache_group`` deliberately share one cache (and
  can learn each other's prompts that way); a group name is 1-64 characters like a tenant name.
* Limits, priority and cache group belong to the tenant, so all keys of one tenant must end up
  with the same ones.
* Tenant names: 1-64 characters of ``A-Z a-z 0-9 . _ -``. Keys: 1-256 printable ASCII
  characters, no spaces. A key may appear once (also across the file and ``--api-key``).

Errors name the file and the offending entry. Keys are never logged or shown in full: messages and
``repr`` show at most the first four characters of a key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from quire.server.errors import APIError
from quire.server.ratelimit import RateLimits

ANONYMOUS_TENANT = "anonymous"
CLI_KEY_TENANT = "default"

_TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY_RE = re.compile(r"[\x21-\x7e]{1,256}")
_LIMIT_FIELDS = tuple(f.name for f in fields(RateLimits))
# Field names of the key file, safe to show in errors (anything else may be a key).
_ENTRY_FIELDS = ("tenant", "limits", "priority", "cache_group")
_FILE_FIELDS = frozenset(("keys", "default_limits", "min", "max", *_ENTRY_FIELDS, *_LIMIT_FIELDS))
# Priorities are compared, never counted: any 32-bit range is plenty, and bounding it keeps every
# admitted value serializable for the engine.
PRIORITY_BOUND = 2**31 - 1


@dataclass(frozen=True)
class PriorityGrant:
    """The ``priority`` values a tenant may send: ``min`` (most urgent allowed) to ``max``.

    Lower is more urgent (see ``quire.core.scheduler``). The default allows nothing more urgent
    than the normal level 0, so only tenants the operator trusts can jump the queue."""

    min: int = 0
    max: int = PRIORITY_BOUND

    def __post_init__(self) -> None:
        for name in ("min", "max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or abs(value) > PRIORITY_BOUND:
                raise ValueError(
                    f"priority {name} must be an integer in [-{PRIORITY_BOUND}, {PRIORITY_BOUND}], got {value!r}"
                )
        if not self.min <= 0 <= self.max:
            raise ValueError(
                f"a priority grant must include 0, the level of requests that send no priority; "
                f"got [{self.min}, {self.max}]"
            )

    def check(self, priority: int) -> None:
        """Raise the 400 :class:`APIError` if ``priority`` is outside the grant."""
        if not self.min <= priority <= self.max:
            shown = str(priority) if abs(priority) < 10**12 else f"{str(priority)[:12]}..."
            raise APIError.invalid_request(
                f"priority {shown} is outside the range this API key may use, [{self.min}, {self.max}] "
                "(lower is more urgent); the server operator grants ranges per tenant in the key file.",
                param="priority",
            )


@dataclass(frozen=True)
class Tenant:
    """Who a request is billed to, for rate limiting and logs, and what it may do.

    ``priority``: the request priorities it may use. ``cache_group``: tenants of one group share
    prefix-cache entries; None (the default) keeps the tenant's entries to itself."""

    name: str
    limits: RateLimits = field(default_factory=RateLimits)
    priority: PriorityGrant = field(default_factory=PriorityGrant)
    cache_group: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TENANT_RE.fullmatch(self.name):
            raise ValueError(f"tenant name must be 1-64 characters of A-Z a-z 0-9 . _ -, got {self.name!r}")
        if self.cache_group is not None and (
            not isinstance(self.cache_group, str) or not _TENANT_RE.fullmatch(self.cache_group)
        ):
            raise ValueError(
                f"cache_group must be 1-64 characters of A-Z a-z 0-9 . _ -, got {self.cache_group!r}"
            )

    @property
    def cache_salt(self) -> bytes:
        """What the engine mixes into this tenant's prefix-cache keys: one value per tenant, or per
        cache group. A digest, so that every salt has the same length and no tenant's salted
        token block can equal another's."""
        scope = f"group\0{self.cache_group}" if self.cache_group is not None else f"tenant\0{self.name}"
        return hashlib.sha256(f"quire prefix cache\0{scope}".encode()).digest()


class KeyFileError(ValueError):
    """A problem in an ``--api-key-file``; the message names the file and the entry."""


def redact(key: str) -> str:
    """A form of ``key`` safe to show: its first four characters, only if it is long enough."""
    return f"{key[:4]}…" if len(key) >= 16 else "…"


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests means compare_digest's time does not depend on the
    # presented key's length either.
    return hashlib.sha256(key.encode("utf-8", errors="replace")).digest()


class KeyRing:
    """The configured API keys and the tenant each one maps to.

    Holds SHA-256 digests, not the keys, so a stray ``repr`` or traceback cannot print them.
    """

    def __init__(
        self,
        tenants_by_key: Mapping[str, Tenant] | None = None,
        *,
        default_limits: RateLimits | None = None,
    ) -> None:
        self._default_limits = default_limits or RateLimits()
        self._anonymous = Tenant(ANONYMOUS_TENANT, self._default_limits)
        self._entries: list[tuple[bytes, Tenant]] = []
        self._tenants: dict[str, Tenant] = {}
        for key, tenant in (tenants_by_key or {}).items():
            _check_key(key, "API key")
            known = self._tenants.setdefault(tenant.name, tenant)
            if known != tenant:
                raise ValueError(
                    f"tenant '{tenant.name}' is given different limits, priority or cache_group by "
                    "different keys; these belong to the tenant, make them identical"
                )
            self._entries.append((_digest(key), tenant))

    @classmethod
    def from_sources(
        cls,
        api_keys: Sequence[str] = (),
        api_key_file: str | os.PathLike[str] | None = None,
        *,
        default_limits: RateLimits | None = None,
    ) -> KeyRing:
        """Build from ``--api-key`` values and/or an ``--api-key-file``.

        ``default_limits`` (e.g. from server-wide flags) apply to the anonymous tenant and the
        ``--api-key`` tenant, and are the base for file keys: the file's ``default_limits`` and then
        each key's ``limits`` override them field by field.
        """
        tenants_by_key: dict[str, Tenant] = {}
        if api_key_file is not None:
            tenants_by_key = load_key_file(api_key_file, default_limits=default_limits)
        cli_tenant = next(
            (t for t in tenants_by_key.values() if t.name == CLI_KEY_TENANT),
            Tenant(CLI_KEY_TENANT, default_limits or RateLimits()),
        )
        for index, key in enumerate(api_keys):
            _check_key(key, f"--api-key #{index + 1}")
            if key in tenants_by_key:
                raise ValueError(
                    f"--api-key #{index + 1} ({redact(key)}) is given twice (on the command line or also "
                    "in the key file); give each key once"
                )
            tenants_by_key[key] = cli_tenant
        return cls(tenants_by_key, default_limits=default_limits)

    @property
    def enabled(self) -> bool:
        """Whether requests must present a key."""
        return bool(self._entries)

    @property
    def anonymous(self) -> Tenant:
        return self._anonymous

    @property
    def tenants(self) -> tuple[Tenant, ...]:
        return tuple(self._tenants.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"KeyRing(keys={len(self._entries)}, tenants={sorted(self._tenants)})"

    def limits_for(self, tenant: str) -> RateLimits:
        """The limits of a tenant by name; unknown names (and ``anonymous``) get the defaults."""
        known = self._tenants.get(tenant)
        return known.limits if known is not None else self._default_limits

    def authenticate(self, authorization_header: str | None) -> Tenant | None:
        """The tenant for an ``Authorization: Bearer <key>`` header, or None to reject (401).

        With auth disabled, every request (with or without a header) is the anonymous tenant.
        """
        if not self._entries:
            return self._anonymous
        token = _bearer_token(authorization_header)
        if token is None:
            return None
        presented = _digest(token)
        matched: Tenant | None = None
        # Compare against every key without stopping at a match, so the response time does not
        # reveal which (or whether an early) key matched.
        for digest, tenant in self._entries:
            if hmac.compare_digest(presented, digest):
                matched = tenant
        return matched

    def require(self, authorization_header: str | None) -> Tenant:
        """Like :meth:`authenticate`, but raises the 401 :class:`APIError` instead of returning None."""
        tenant = self.authenticate(authorization_header)
        if tenant is not None:
            return tenant
        if _bearer_token(authorization_header) is None:
            raise APIError.unauthorized(
                "You didn't provide an API key. Send it in the header 'Authorization: Bearer <key>'."
            )
        raise APIError.unauthorized("Incorrect API key provided.")


def _bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        return None
    return token


def _check_key(key: object, where: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        shown = redact(key) if isinstance(key, str) else type(key).__name__
        raise ValueError(f"{where} ({shown}) must be 1-256 printable ASCII characters without spaces")


# ---------------------------------------------------------------------------------------------
# Key file parsing


def load_key_file(
    path: str | os.PathLike[str], *, default_limits: RateLimits | None = None
) -> dict[str, Tenant]:
    """Parse an ``--api-key-file`` into ``{key: Tenant}``; raises :class:`KeyFileError`."""
    path = Path(path)
    where = f"API key file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"{where}: cannot read it ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKey as exc:
        raise KeyFileError(f"{where}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise KeyFileError(
            f"{where}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict):
        raise KeyFileError(f'{where}: the top level must be an object like {{"keys": {{...}}}}')
    _reject_unknown(data, ("keys", "default_limits"), where)

    base = _limits_fields(default_limits or RateLimits())
    if "default_limits" in data:
        base = _merge_limits(base, data["default_limits"], f"{where}: default_limits")
        _build_limits(base, f"{where}: default_limits")

    keys = data.get("keys")
    if not isinstance(keys, dict) or not keys:
        raise KeyFileError(f'{where}: "keys" must be a non-empty object mapping each key to its tenant')

    result: dict[str, Tenant] = {}
    tenants: dict[str, tuple[Tenant, str]] = {}
    for index, (key, entry) in enumerate(keys.items()):
        label = f"{where}: keys entry #{index + 1} ({redact(key)})"
        try:
            _check_key(key, "the key")
        except ValueError as exc:
            raise KeyFileError(f"{label}: {exc}") from None
        tenant = _parse_entry(entry, base, label)
        if tenant.name in tenants and tenants[tenant.name][0] != tenant:
            raise KeyFileError(
                f"{label}: tenant '{tenant.name}' gets limits, priority or cache_group different from "
                f"{tenants[tenant.name][1]}; these belong to the tenant, so give all its keys the same ones"
            )
        tenants.setdefault(tenant.name, (tenant, f"keys entry #{index + 1}"))
        result[key] = tenants[tenant.name][0]
    return result


def _parse_entry(entry: Any, base: dict[str, Any], label: str) -> Tenant:
    if isinstance(entry, str):
        entry = {"tenant": entry}
    if not isinstance(entry, dict):
        raise KeyFileError(f'{label}: must be a tenant name or an object like {{"tenant": "acme"}}')
    _reject_unknown(entry, _ENTRY_FIELDS, label)
    name = entry.get("tenant")
    if not isinstance(name, str) or not _TENANT_RE.fullmatch(name):
        raise KeyFileError(f"{label}: tenant must be 1-64 characters of A-Z a-z 0-9 . _ -, got {name!r}")
    limits = base
    if "limits" in entry:
        limits = _merge_limits(base, entry["limits"], f"{label}: limits")
    rate_limits = _build_limits(limits, f"{label}: limits")
    priority = _parse_priority(entry.get("priority"), f"{label}: priority")
    try:
        return Tenant(name, rate_limits, priority, entry.get("cache_group"))
    except ValueError as exc:  # Tenant's own checks (cache_group), worded for the file
        raise KeyFileError(f"{label}: {exc}") from None


def _parse_priority(grant: Any, label: str) -> PriorityGrant:
    if grant is None:
        return PriorityGrant()
    if not isinstance(grant, dict):
        raise KeyFileError(f'{label}: must be an object like {{"min": -10, "max": 10}}')
    _reject_unknown(grant, ("min", "max"), label)
    try:
        return PriorityGrant(**grant)
    except ValueError as exc:
        raise KeyFileError(f"{label}: {exc}") from None


def _limits_fields(limits: RateLimits) -> dict[str, Any]:
    return {name: getattr(limits, name) for name in _LIMIT_FIELDS}


def _merge_limits(base: dict[str, Any], override: Any, label: str) -> dict[str, Any]:
    if not isinstance(override, dict):
        raise KeyFileError(f"{label}: must be an object with fields {', '.join(_LIMIT_FIELDS)}")
    _reject_unknown(override, _LIMIT_FIELDS, label)
    merged = {**base, **override}
    # Dropping a rate also drops its inherited burst; otherwise `"requests_per_minute": null`
    # would fail with "burst without a rate" because of a default the user did not write.
    for rate, burst in (("requests_per_minute", "request_burst"), ("tokens_per_minute", "token_burst")):
        if rate in override and override[rate] is None and burst not in override:
            merged[burst] = None
    return merged


def _build_limits(values: dict[str, Any], label: str) -> RateLimits:
    try:
        return RateLimits(**values)
    except ValueError as exc:
        raise KeyFileError(f"{label}: {exc}") from None


def _reject_unknown(obj: Mapping[str, Any], allowed: Iterable[str], label: str) -> None:
    allowed = tuple(allowed)
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise KeyFileError(
            f"{label}: unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(allowed)}"
        )


class _DuplicateKey(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of duplicate names; for a key file that hides mistakes.
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            shown = repr(name) if name in _FILE_FIELDS else redact(name)
            raise _DuplicateKey(f"{shown} appears twice in one object; give each key or field once")
        result[name] = value
    return result
