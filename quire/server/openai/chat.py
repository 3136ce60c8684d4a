"""``POST /v1/chat/completions``: the model's chat template applied server-side, OpenAI's chat shape.

Streaming follows OpenAI's sequence per choice: a first chunk with ``{"role": "assistant",
"content": ""}``, content deltas, a last chunk with an empty delta and the ``finish_reason``, then
(with ``stream_options.include_usage``) a usage chunk with no choices, and ``[DONE]``.

Before the template runs: the priority grant, the rate limit (``precheck``), the template policy
(template source from a request only with ``--trust-request-chat-template``; no template argument
may replace ``messages``, ``add_generation_prompt``, ``tools``...) and the prompt-size limit. The
render and the tokenizing then run in a worker thread, bounded by ``RenderLimits``.

Tools (``tool_choice.py``): the request's tools reach the template as its ``tools`` variable, an
enforced ``tool_choice`` becomes the request's grammar, and the output is read for calls
(``tool_output.py``) in the stream and in the whole answer alike.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from starlette.responses import Response

from quire.sampling import CompletionOutput
from quire.server.errors import APIError
from quire.server.openai.admission import (
    check_priority,
    check_prompt_bytes,
    precheck,
    prompt_too_large,
    submit,
)
from quire.server.openai.logprobs import chat_logprobs
from quire.server.openai.protocol import ChatCompletionRequest, ChatMessage
from quire.server.openai.streaming import collect_choices, stream_chunks
from quire.server.openai.tool_choice import ToolPlan, plan_tools
from quire.server.openai.tool_output import StreamedToolCalls, chat_message, finish_reason
from quire.server.settings import ServerSettings
from quire.server.sse import ChunkFramer, SSEResponse
from quire.server.state import ServerState, context, server_state
from quire.tokenizer import Tokenizer
from quire.tokenizer.chat_template import FIXED_VARIABLES
from quire.tokenizer.template_limits import RenderLimits

router = APIRouter()

# A render bounds itself (RenderLimits.max_seconds, checked inside the template's own code); this
# outer timeout only answers the client if a single uninterruptible step overran that.
_RENDER_TIMEOUT_S = 2 * RenderLimits().max_seconds + 1.0


async def render_chat_prompt(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any] | None = None,
    chat_template: str | None = None,
    max_prompt_bytes: int | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[int]]:
    """The templated prompt and its token ids, rendered and tokenized in a worker thread so that
    neither blocks the event loop. Raises ``ValueError`` (a 400) if the template rejects the
    conversation or goes past its render limits, and the 413 :class:`APIError` for a prompt of
    more than ``max_prompt_bytes`` (checked before tokenizing it).

    ``chat_template`` must already be vetted (see :func:`check_request_template`); one in
    ``template_kwargs`` is ignored. ``tools`` reach the template as its ``tools`` variable."""
    dicts = [m.template_dict() for m in messages]
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k != "chat_template"}
    work = asyncio.to_thread(
        _render, tokenizer, dicts, add_generation_prompt, chat_template, kwargs, max_prompt_bytes, tools
    )
    try:
        return await asyncio.wait_for(work, _RENDER_TIMEOUT_S)
    except TimeoutError:
        raise ValueError(
            f"chat template rendering exceeded its time limit of {RenderLimits().max_seconds:g} s"
        ) from None


def _render(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    chat_template: str | None,
    kwargs: dict[str, Any],
    max_prompt_bytes: int | None,
    tools: list[dict[str, Any]] | None,
) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        tools=tools,
        chat_template=chat_template,
        **kwargs,
    )
    if max_prompt_bytes is not None and (size := len(text.encode("utf-8"))) > max_prompt_bytes:
        raise prompt_too_large(size, max_prompt_bytes, "messages")
    # The template already wrote any BOS token it wants; adding special tokens would double it.
    return text, tokenizer.encode(text, add_special_tokens=False)


def check_request_template(
    body: ChatCompletionRequest, tokenizer: Tokenizer, settings: ServerSettings
) -> str | None:
    """The ``chat_template`` a request asks for (top level or in ``chat_template_kwargs``), or
    None; raises the 400 :class:`APIError` for what the policy refuses.

    The name of one of the model's own templates is always fine. Template source is a program the
    server would run, so it is refused unless the operator passed ``--trust-request-chat-template``
    (as vLLM does). ``chat_template_kwargs`` may not replace the variables the request's own fields
    set (``messages``, ``add_generation_prompt``, ``tools``, ...)."""
    kwargs = body.chat_template_kwargs or {}
    for name in kwargs:
        if name in FIXED_VARIABLES:
            raise APIError.invalid_request(
                f"chat_template_kwargs may not set {name!r}: the server sets it from the request's own fields",
                param=f"chat_template_kwargs.{name}",
            )
    in_kwargs = kwargs.get("chat_template")
    if body.chat_template is not None and in_kwargs is not None:
        raise APIError.invalid_request(
            "chat_template is given twice (top level and in chat_template_kwargs); give it once",
            param="chat_template",
        )
    template = body.chat_template if body.chat_template is not None else in_kwargs
    param = "chat_template" if body.chat_template is not None else "chat_template_kwargs.chat_template"
    if template is None or (isinstance(template, str) and template in tokenizer.chat_template_names):
        return template
    if not isinstance(template, str):
        raise APIError.invalid_request("chat_template must be a string", param=param)
    if not settings.trust_request_chat_template:
        names = ", ".join(tokenizer.chat_template_names) or "none"
        raise APIError.invalid_request(
            "This server does not run chat templates sent with requests (the operator can allow it "
            "with --trust-request-chat-template). Leave chat_template out, or give the name of one "
            f"of the model's own templates ({names}).",
            param=param,
        )
    return template


def _check_message_size(messages: list[ChatMessage], state: ServerState) -> None:
    # The prompt holds every message's text: refuse what the prompt limit could never admit
    # before paying for the render and the tokenizing.
    size = sum(len(m.text.encode("utf-8")) for m in messages)
    size += sum(len(c.function.arguments.encode("utf-8")) for m in messages for c in m.tool_calls or ())
    check_prompt_bytes(state, size, "messages")


class _Formatter:
    """Chat chunk choices: ``{"index", "delta", "logprobs", "finish_reason"}``. When the output is
    read for tool calls, text goes through ``StreamedToolCalls``: one engine delta may become
    several chunks (a call's header, then its arguments), or none while text is held back."""

    def __init__(self, top_logprobs: int | None, tools: ToolPlan) -> None:
        self.top_logprobs = top_logprobs
        self.calls = StreamedToolCalls(tools) if tools.parses_output else None

    def opening(self, index: int) -> dict[str, Any] | None:
        return {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def delta(self, index: int, seq: CompletionOutput) -> list[dict[str, Any]]:
        logprobs = None
        if self.top_logprobs is not None and seq.logprobs is not None:
            logprobs = {
                "content": chat_logprobs(seq.token_ids, seq.logprobs, self.top_logprobs),
                "refusal": None,
            }
        if self.calls is None:
            return [
                {"index": index, "delta": {"content": seq.text}, "logprobs": logprobs, "finish_reason": None}
            ]
        chunks = self.calls.feed(index, seq.text)
        if logprobs is not None:
            # Logprobs go out with their tokens' first chunk, or alone while the text is held back.
            chunks = chunks or [{"index": index, "delta": {}, "logprobs": None, "finish_reason": None}]
            chunks[0]["logprobs"] = logprobs
        return chunks

    def closing(self, index: int, seq: CompletionOutput) -> list[dict[str, Any]]:
        chunks = self.calls.finish(index) if self.calls is not None else []
        called = self.calls is not None and self.calls.called(index)
        reason = finish_reason(seq.finish_reason, called)
        return [*chunks, {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state, ctx = server_state(request), context(request)
    ctx.model, ctx.stream = body.model or state.model_name, body.stream
    state.check_model(body.model)
    tools = plan_tools(body, state.settings)
    top_logprobs = body.num_logprobs()
    defaults = state.settings.sampling_defaults
    params = tools.apply(body.sampling_params(body.max_new_tokens(), top_logprobs, defaults))
    client = state.engine()
    assert client.tokenizer is not None and ctx.auth is not None
    check_priority(state, ctx.auth, body.priority)  # submit checks it too; here before the render's cost
    precheck(state, ctx.auth, params)  # a tenant over its rate limit costs no template rendering
    template = check_request_template(body, client.tokenizer, state.settings)
    _check_message_size(body.messages, state)
    text, token_ids = await render_chat_prompt(
        client.tokenizer,
        body.messages,
        body.add_generation_prompt,
        body.chat_template_kwargs,
        template,
        state.settings.max_prompt_bytes,
        tools.template_tools,
    )
    if state.settings.log_prompts:
        ctx.prompt_text = text
    prompt = {"prompt_token_ids": token_ids, "prompt": text}
    gen = await submit(state, ctx, ctx.auth, [prompt], params, body.priority, body.stream)
    created = int(time.time())
    head = {"id": f"chatcmpl-{ctx.request_id}", "object": "chat.completion.chunk", "created": created}
    head["model"] = state.model_name
    if body.stream:
        formatter = _Formatter(top_logprobs, tools)
        return SSEResponse(
            stream_chunks(gen, ChunkFramer(head, body.include_usage), formatter, body.include_usage)
        )

    choices = await collect_choices(request, gen)
    out = []
    for choice in choices:
        logprobs = None
        if top_logprobs is not None and choice.logprobs is not None:
            logprobs = {
                "content": chat_logprobs(choice.token_ids, choice.logprobs, top_logprobs),
                "refusal": None,
            }
        message = chat_message(choice.text, tools)
        out.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason(choice.finish_reason, "tool_calls" in message),
                "stop_reason": choice.stop_reason,
            }
        )
    payload = {**head, "object": "chat.completion", "choices": out, "usage": gen.usage()}
    return Response(msgspec.json.encode(payload), media_type="application/json")
