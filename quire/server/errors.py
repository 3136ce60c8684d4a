"""OpenAI-format error bodies and the exception route code raises to produce them.

Every error the server returns has the shape OpenAI's API uses, so the official clients
(which map the HTTP status to an exception class and show ``error.message``) behave as they do
against OpenAI::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Default ``type`` / ``code`` by status, following what OpenAI itself sends (clients branch on the
status and ``code``, never on ``type``):

====== ======================== ==========================================================
status type                     code (default)
====== ======================== ==========================================================
400    invalid_request_error    None
401    invalid_request_error    ``invalid_api_key`` (OpenAI uses this type for bad keys)
403    permission_error         None
404    invalid_request_error    None; ``model_not_found`` via :meth:`APIError.model_not_found`
413    invalid_request_error    ``request_too_large``
429    rate_limit_error         ``rate_limit_exceeded``
500    server_error             None
503    service_unavailable      ``service_unavailable``
====== ======================== ==========================================================

Route code raises :class:`APIError`; the app's exception handler (in ``server/app.py``) turns it
into ``JSONResponse(err.body(), status_code=err.status, headers=err.headers)``. This module has no
web-framework imports so policy code and tests can use it without FastAPI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# Immutable: read-only lookup tables, not mutable state.
_DEFAULT_TYPE: Mapping[int, str] = MappingProxyType(
    {
        400: "invalid_request_error",
        401: "invalid_request_error",
        403: "permission_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        501: "server_error",
        503: "service_unavailable",
    }
)
_DEFAULT_CODE: Mapping[int, str] = MappingProxyType(
    {
        401: "invalid_api_key",
        413: "request_too_large",
        429: "rate_limit_exceeded",
        503: "service_unavailable",
    }
)


def default_error_type(status: int) -> str:
    """The conventional OpenAI ``type`` for an HTTP status (4xx fallback ``invalid_request_error``)."""
    if status in _DEFAULT_TYPE:
        return _DEFAULT_TYPE[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def _check_status(status: int) -> None:
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise ValueError(f"error status must be an HTTP error code in 400..599, got {status!r}")


@dataclass(frozen=True)
class ErrorBody:
    """The inner ``error`` object of an OpenAI error response."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None

    def __post_init__(self) -> None:
        if not self.message:
            raise ValueError("error message must not be empty; say what was wrong and how to fix it")
        if not self.type:
            raise ValueError("error type must not be empty, e.g. 'invalid_request_error'")

    def to_dict(self) -> dict[str, Any]:
        """``{"error": {...}}``, ready for JSON."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def openai_error(
    status: int,
    message: str,
    type_: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """Build ``{"error": {"message", "type", "param", "code"}}`` with conventional defaults for ``status``."""
    _check_status(status)
    return ErrorBody(
        message=message,
        type=type_ or default_error_type(status),
        param=param,
        code=code if code is not None else _DEFAULT_CODE.get(status),
    ).to_dict()


def retry_after_header(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1.

    At least 1 because ``Retry-After: 0`` invites a client to retry immediately, in a tight loop.
    """
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"Retry-After needs a finite non-negative number of seconds, got {seconds!r}")
    return str(max(1, math.ceil(seconds)))


class APIError(Exception):
    """An error to return to the client in OpenAI format; raise it from route code.

    ``headers`` are extra response headers, e.g. ``Retry-After`` on 429 / 503 or
    ``WWW-Authenticate`` on 401.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        _check_status(status)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or default_error_type(status)
        self.param = param
        self.code = code if code is not None else _DEFAULT_CODE.get(status)
        self.headers: dict[str, str] = dict(headers or {})
        # Validate the body now so a bad error is found where it is raised, not in the handler.
        self._body = ErrorBody(self.message, self.type, self.param, self.code)

    def body(self) -> dict[str, Any]:
        """The JSON response body."""
        return self._body.to_dict()

    def __repr__(self) -> str:
        return f"APIError(status={self.status}, type={self.type!r}, code={self.code!r}, message={self.message!r})"

    # Constructors for the errors every route needs, so their wording stays consistent.

    @classmethod
    def invalid_request(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, param=param, code=code)

    @classmethod
    def unauthorized(cls, message: str | None = None) -> APIError:
        return cls(
            401,
            message or "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @classmethod
    def model_not_found(cls, model: str) -> APIError:
        return cls(
            404,
            f"The model '{model}' does not exist. GET /v1/models lists the models this server serves.",
            param="model",
            code="model_not_found",
        )

    @classmethod
    def payload_too_large(cls, message: str) -> APIError:
        return cls(413, message)

    @classmethod
    def rate_limited(cls, message: str, retry_after_s: float | None = None) -> APIError:
        headers = {} if retry_after_s is None else {"Retry-After": retry_after_header(retry_after_s)}
        return cls(429, message, headers=headers)

    @classmethod
    def overloaded(
        cls, message: str, retry_after_s: float | None = None, code: str | None = None
    ) -> APIError:
        headers = {} if retry_after_s is None else {"Retry-After": retry_after_header(retry_after_s)}
        return cls(503, message, code=code, headers=headers)
