"""The ``/openapi.json`` schema, corrected to describe the errors the server really returns.

FastAPI documents a ``422`` with its own validation-error body on every route that takes a body,
but this server answers bad input with a ``400`` in OpenAI's error format (see ``errors.py``), and
refuses requests with 401, 413, 429 and 503 in the same format. Clients generated from the schema
should expect exactly that.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA_NAME = "ErrorResponse"
_ERROR_REF = {"$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"}
ERROR_SCHEMA: dict[str, Any] = {
    "title": ERROR_SCHEMA_NAME,
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
# Which refusals each kind of route can answer with, besides 400 for a bad body.
_BODY_ERRORS = {"400": "Invalid request (OpenAI error format)", "413": "Request body or prompt too large"}
_ADMISSION_ERRORS = {
    "401": "Missing or invalid API key",
    "429": "Rate limit reached; see Retry-After",
    "503": "Not ready, at capacity or shutting down; see Retry-After",
}
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) describe OpenAI-format errors."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = openai_error_responses(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def openai_error_responses(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace every documented 422 with the 4xx/5xx the route can really return."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            had_body = responses.pop("422", None) is not None or "requestBody" in operation
            errors: dict[str, str] = dict(_BODY_ERRORS) if had_body else {}
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
                errors.update(_ADMISSION_ERRORS)
            if "{model" in path:
                errors["404"] = "No model of that name is served"
            for status, description in sorted(errors.items()):
                responses.setdefault(
                    status,
                    {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}},
                )
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    schemas[ERROR_SCHEMA_NAME] = ERROR_SCHEMA
    return schema
