"""A request's ask for structured output, in any of the three spellings clients use, as one
``StructuredOutputsParams``.

- OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``
  (any JSON object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict",
  "description"}}``. quire enforces the schema exactly whether ``strict`` is true or not (OpenAI
  only guarantees it with ``strict: true``), and takes the full JSON Schema its grammar engine
  supports rather than only OpenAI's strict subset; ``name`` and ``description`` do not reach the
  model.
- vLLM's ``structured_outputs`` object: one of ``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``, plus ``disable_any_whitespace``.
- vLLM's older top-level ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``
  (``guided_decoding_backend`` may name quire's engine or ``auto``; any other backend is a 400).

A request asks one way or not at all: two asks (``response_format`` json and ``guided_regex``, or
two ``guided_*`` fields) are a 400 naming both. Whether the schema, regex or grammar compiles is
checked here too, with the grammar engine's own ``validate``, so that its 400 names the field the
client used (``response_format``, ``structured_outputs.json``, ``guided_regex``, ...);
``InputProcessor.check_params`` checks again for every caller, the server's own constraints (tool
calls) and offline use included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from quire.server.errors import APIError
from quire.structured.backend import LRUCache, validate_structured_outputs
from quire.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from quire.server.openai.protocol import _SamplingFields

# What `guided_decoding_backend` may say: quire has one grammar engine (llguidance; vLLM calls it
# "guidance"), so only a request for that one, or for the server's choice, is meaningful.
ACCEPTED_BACKENDS = frozenset({"auto", "guidance", "llguidance"})
_GUIDED_KINDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def structured_outputs_of(body: _SamplingFields) -> StructuredOutputsParams | None:
    """The request's output constraint, or None; raises a 400 :class:`APIError` naming the field
    at fault."""
    _check_backend(body.guided_decoding_backend)
    asks: list[tuple[str, Callable[[], StructuredOutputsParams | None]]] = []
    if body.response_format is not None and body.response_format.type != "text":
        asks.append(("response_format", lambda: _from_response_format(body)))
    if body.structured_outputs is not None:
        asks.append(("structured_outputs", lambda: _from_structured_outputs(body)))
    for name, kind in _GUIDED_KINDS.items():
        value = getattr(body, name)
        if value is not None:
            asks.append((name, lambda kind=kind, value=value: StructuredOutputsParams(**{kind: value})))
    if len(asks) > 1:
        names = " and ".join(name for name, _ in asks)
        raise APIError.invalid_request(
            f"Structured output is requested in more than one way ({names}); use one of them",
            param=asks[1][0],
        )
    if not asks:
        return None
    name, build = asks[0]
    try:
        params = build()
    except ValueError as exc:
        raise APIError.invalid_request(str(exc), param=name) from None
    if params is not None:
        _check_compiles(params, f"{name}.{params.kind}" if name == "structured_outputs" else name)
    return params


def _check_compiles(params: StructuredOutputsParams, param: str) -> None:
    """The 400 naming ``param`` when the grammar engine cannot compile the constraint."""
    if params.kind == "json_object":
        return  # a fixed grammar: nothing the client wrote can break it
    try:
        validate_structured_outputs(params, cache=_VERDICTS)
    except ValueError as exc:
        raise APIError.invalid_request(str(exc), param=param) from None


# Whether constraints compile, remembered for the 1,024 most recently seen (by digest). Clients
# resend the same schema with every request, and validating a realistic one takes about a
# millisecond on the event loop. A verdict is a pure function of the constraint, so one memo per
# process is safe, like functools.lru_cache. The engine's InputProcessor keeps its own.
_VERDICTS = LRUCache(1024)


def _from_response_format(body: _SamplingFields) -> StructuredOutputsParams:
    response_format = body.response_format
    assert response_format is not None
    if response_format.type == "json_object":
        if response_format.json_schema is not None:
            raise ValueError("response_format of type json_object takes no json_schema")
        return StructuredOutputsParams(json_object=True)
    spec = response_format.json_schema
    if spec is None:
        raise ValueError("response_format of type json_schema needs a json_schema object")
    if spec.schema_ is None:
        raise ValueError("response_format.json_schema needs a schema (a JSON Schema object)")
    return StructuredOutputsParams(json=spec.schema_)


def _from_structured_outputs(body: _SamplingFields) -> StructuredOutputsParams:
    request = body.structured_outputs
    assert request is not None
    fields: dict[str, Any] = {
        "json": request.json_,
        "regex": request.regex,
        "choice": request.choice,
        "grammar": request.grammar,
        "json_object": bool(request.json_object),
        "disable_any_whitespace": request.disable_any_whitespace,
    }
    return StructuredOutputsParams(**fields)


def _check_backend(backend: str | None) -> None:
    if backend is not None and backend not in ACCEPTED_BACKENDS:
        raise APIError.invalid_request(
            f"guided_decoding_backend {backend!r} is not available: quire's grammar engine is "
            f"llguidance; send one of {', '.join(sorted(ACCEPTED_BACKENDS))}, or leave it out",
            param="guided_decoding_backend",
        )
