"""The FastAPI app: routes, exception handlers, the edge middleware and the engine's lifespan.

``build_app(state)`` wires an existing ``ServerState`` (engine client + policy) into an app. The
lifespan starts loading the engine in the background and returns at once, so the port answers
``/health`` with 503 while the model loads and 200 once it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from quire import __version__
from quire.frontend.async_client import EngineDeadError
from quire.server.errors import APIError, openai_error
from quire.server.middleware import EdgeMiddleware
from quire.server.openai import chat, completions
from quire.server.openai.admission import tokenize_text
from quire.server.openai.field_policy import unknown_field_message
from quire.server.openai.protocol import DetokenizeRequest, TokenizeRequest
from quire.server.openai.serving import ClientDisconnected, engine_dead_error
from quire.server.openai.streaming import CLIENT_CLOSED_STATUS
from quire.server.openapi import install_openapi
from quire.server.state import ServerState, context, server_state

logger = logging.getLogger(__name__)


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        msgspec.json.encode(payload), status_code=status, headers=headers, media_type="application/json"
    )


def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.ensure_future(state.start_engine())
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            await state.stop_engine()

    app = FastAPI(title="quire", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.quire = state
    app.add_middleware(EdgeMiddleware, state=state)
    settings = state.settings
    if settings.allowed_origins:
        # Added last, so outermost: a browser's preflight (OPTIONS, no Authorization header) is
        # answered before the edge asks for a key, and error responses carry the CORS headers too.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=list(settings.allowed_methods),
            allow_headers=list(settings.allowed_headers),
        )
    _install_error_handlers(app)
    install_openapi(app)
    app.include_router(completions.router)
    app.include_router(chat.router)
    _add_info_routes(app)
    _add_tokenizer_routes(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    # Every error leaves in OpenAI's format, and bad input is a 4xx, never a 500.

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return json_response(exc.body(), exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        server_state(request).metrics.inc_rejected("invalid")
        message, param = _describe_validation(exc)
        return json_response(openai_error(400, message, param=param), 400)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> Response:
        server_state(request).metrics.inc_rejected("invalid")
        return json_response(openai_error(400, str(exc) or "invalid request"), 400)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, exc: EngineDeadError) -> Response:
        error = engine_dead_error(exc)
        return json_response(error.body(), error.status, error.headers)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_STATUS)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        return json_response(openai_error(exc.status_code, message), exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("request %s failed", context(request).request_id)
        return json_response(openai_error(500, "The server had an internal error; see its log."), 500)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence for pydantic's error list, and the offending field for ``param``."""
    errors = exc.errors()
    if not errors:
        return "The request body is invalid.", None
    # An unknown field is the most actionable thing to report. After it, a failed check on a
    # well-typed value (say, a lone surrogate in a string) says more than the type mismatches a
    # union reports for its other alternatives.
    unknown = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
    if unknown is not None:
        field = _field_name(unknown.get("loc", ()))
        return unknown_field_message(field), field
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('msg', '')}", None
    fields = [_field_name(error.get("loc", ())) for error in errors]
    field = _field_name(first.get("loc", ()))
    reason = first.get("msg", "invalid value")
    if first.get("type") == "value_error":
        reason = reason.removeprefix("Value error, ")  # pydantic's prefix to our own message
    if not field:
        return f"The request body must be a JSON object with the request's fields: {reason}", None
    if len(set(fields)) == 1 and len(errors) > 1:
        # A union type reports one error per alternative; the first one says enough.
        return f"Invalid value for '{field}': it matches none of the accepted types ({reason})", field
    message = f"Invalid value for '{field}': {reason}"
    others = sorted({f for f in fields if f and f != field})
    if others:
        message += f" (also invalid: {', '.join(others)})"
    return message, field


def _field_name(loc: tuple) -> str:
    """``("body", "messages", 0, "role")`` -> ``"messages.0.role"``, without pydantic's type tags."""
    parts = []
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif "[" in part or part in _TYPE_TAGS:
            break  # a union alternative's name, e.g. "list[int]" or "str"
        else:
            parts.append(part)
    return ".".join(parts)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "function-after", "function-plain"})


def _probe(state: ServerState, ok: bool) -> Response:
    if ok:
        return Response(status_code=200)
    return json_response(openai_error(503, state.unavailable_reason() or "unavailable"), 503)


def _add_info_routes(app: FastAPI) -> None:
    # /health is vLLM's readiness probe (200 only when requests can be served); /health/ready is
    # the same under its Kubernetes name. /health/live stays 200 while the engine loads, restarts
    # or drains: the process is fine, restarting it would only lose work.
    @app.get("/health")
    @app.get("/health/ready")
    async def health(request: Request) -> Response:
        state = server_state(request)
        return _probe(state, state.healthy)

    @app.get("/health/live")
    async def live(request: Request) -> Response:
        state = server_state(request)
        return _probe(state, state.alive)

    @app.get("/version")
    async def version() -> Response:
        return json_response({"version": __version__})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = server_state(request).metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        state = server_state(request)
        return json_response({"object": "list", "data": [_model_card(state, n) for n in state.model_names]})

    # `:path`: served names such as "Qwen/Qwen2.5-0.5B" hold slashes.
    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> Response:
        state = server_state(request)
        state.check_model(model)  # the 404 in OpenAI's format
        return json_response(_model_card(state, model))


def _model_card(state: ServerState, name: str) -> dict[str, object]:
    info = state.client.info
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "quire",
        "root": state.model_path,
        "max_model_len": info.max_model_len if info is not None else None,
        # Lets `quire bench serve` draw token-id prompts inside the vocabulary.
        "vocab_size": info.vocab_size if info is not None else None,
    }


def _add_tokenizer_routes(app: FastAPI) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> Response:
        state = server_state(request)
        state.check_model(body.model)
        client = state.engine()
        tokenizer = client.tokenizer
        assert tokenizer is not None and client.info is not None
        if (body.prompt is None) == (body.messages is None):
            raise APIError.invalid_request("send exactly one of 'prompt' or 'messages'")
        if body.messages is not None:
            _, tokens = await chat.render_chat_prompt(
                tokenizer,
                body.messages,
                body.add_generation_prompt,
                max_prompt_bytes=state.settings.max_prompt_bytes,
            )
        else:
            tokens = await tokenize_text(state, body.prompt or "", body.add_special_tokens)
        context(request).prompt_tokens = len(tokens)
        return json_response(
            {"count": len(tokens), "max_model_len": client.info.max_model_len, "tokens": tokens}
        )

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
        state = server_state(request)
        state.check_model(body.model)
        client = state.engine()
        assert client.tokenizer is not None and client.info is not None
        vocab = client.info.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError.invalid_request(
                f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens"
            )
        return json_response({"prompt": client.tokenizer.decode(body.tokens)})
