"""One structured log line per finished request, and request ids.

The line is a JSON object on the ``quire.requests`` logger at INFO, e.g.::

    {"event": "request", "request_id": "req-…", "tenant": "acme", "model": "tiny", "endpoint":
     "/v1/chat/completions", "stream": true, "status": 200, "prompt_tokens": 12,
     "completion_tokens": 40, "finish_reason": "stop", "queue_ms": 0.4, "ttft_ms": 35.2,
     "e2e_ms": 410.9}

JSON so a log pipeline can parse it and so client-chosen strings (request ids, model names) cannot
forge extra fields or lines. The fields are also passed as ``extra={"quire_request": {...}}`` for
structured handlers.

Prompt and completion text are private: they are logged only when the server runs with
``--log-prompts``, and then in separate ``prompt`` / ``completion`` fields, truncated to
``max_text_chars``. Routes hand the text to :meth:`RequestLogger.log` separately from the record,
so it cannot slip into the default line by accident.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from quire.server.metrics import RequestTimings

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_LEN = 128
# Visible ASCII only: no spaces or control characters, which could split or forge log lines.
_REQUEST_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_LEN}}}")


def new_request_id(prefix: str = "req") -> str:
    """A fresh random id, e.g. ``req-4f1c…`` (32 hex digits)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_request_id(header_value: str | None, prefix: str = "req") -> str:
    """The client's ``X-Request-Id`` if it is 1-128 visible ASCII characters, else a new id.

    An invalid header is replaced, not rejected: a request id is for correlation, never a reason
    to fail a request.
    """
    if header_value is not None and _REQUEST_ID_RE.fullmatch(header_value):
        return header_value
    return new_request_id(prefix)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(max(0.0, seconds) * 1000.0, 3)


@dataclass(frozen=True)
class RequestLogRecord:
    """The facts logged about one finished request; never its text."""

    request_id: str
    tenant: str
    model: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    endpoint: str | None = None
    stream: bool | None = None

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code in 100..599, got {self.status}")
        if self.prompt_tokens < 0 or self.completion_tokens < 0:
            raise ValueError(
                f"token counts must be >= 0, got prompt_tokens={self.prompt_tokens}, "
                f"completion_tokens={self.completion_tokens}"
            )

    @staticmethod
    def timings_ms(metrics: RequestTimings | None, now: float | None = None) -> dict[str, float | None]:
        """``queue_ms``, ``ttft_ms``, ``e2e_ms`` from a request's timestamps, for ``RequestLogRecord(**...)``.

        ``now`` stands in for ``finished_time`` when the request has not recorded one (e.g. an error).
        """
        if metrics is None:
            return {"queue_ms": None, "ttft_ms": None, "e2e_ms": None}
        arrival = metrics.arrival_time
        finished = metrics.finished_time if metrics.finished_time is not None else now

        def since_arrival(t: float | None) -> float | None:
            return None if t is None else _ms(t - arrival)

        return {
            "queue_ms": since_arrival(metrics.first_scheduled_time),
            "ttft_ms": since_arrival(metrics.first_token_time),
            "e2e_ms": since_arrival(finished),
        }


class RequestLogger:
    """Writes :class:`RequestLogRecord` lines; includes text only if ``log_prompts``."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        log_prompts: bool = False,
        max_text_chars: int = 1000,
    ) -> None:
        if max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1, got {max_text_chars}")
        self.logger = logger or logging.getLogger("quire.requests")
        self.log_prompts = log_prompts
        self.max_text_chars = max_text_chars

    def format(self, record: RequestLogRecord, *, prompt: Any = None, completion: Any = None) -> str:
        """The JSON line for ``record`` (with text fields only when ``log_prompts``)."""
        return json.dumps(
            self._fields(record, prompt, completion), ensure_ascii=False, separators=(", ", ": ")
        )

    def log(self, record: RequestLogRecord, *, prompt: Any = None, completion: Any = None) -> None:
        """Log one finished request. ``prompt`` may be a string or chat messages; dropped unless ``log_prompts``."""
        if not self.logger.isEnabledFor(logging.INFO):
            return
        fields = self._fields(record, prompt, completion)
        line = json.dumps(fields, ensure_ascii=False, separators=(", ", ": "))
        self.logger.info("%s", line, extra={"quire_request": fields})

    def _fields(self, record: RequestLogRecord, prompt: Any, completion: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"event": "request", **asdict(record)}
        if self.log_prompts:
            if prompt is not None:
                fields["prompt"] = self._truncate(prompt)
            if completion is not None:
                fields["completion"] = self._truncate(completion)
        return fields

    def _truncate(self, value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        if len(text) <= self.max_text_chars:
            return text
        return f"{text[: self.max_text_chars]}…[+{len(text) - self.max_text_chars} chars]"
