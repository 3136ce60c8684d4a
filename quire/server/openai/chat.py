"""``POST /v1/chat/completions``: the model's chat template applied server-side, OpenAI's chat shape.

Streaming follows OpenAI's sequence per choice: a first chunk with ``{"role": "assistant",
"content": ""}``, content deltas, a last chunk with an empty delta and the ``finish_reason``, then
(with ``stream_options.include_usage``) a usage chunk with no choices, and ``[DONE]``.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from starlette.responses import Response

from quire.sampling import CompletionOutput
from quire.server.openai.logprobs import chat_logprobs
from quire.server.openai.protocol import ChatCompletionRequest, ChatMessage
from quire.server.openai.serving import submit
from quire.server.openai.streaming import collect_choices, stream_chunks
from quire.server.sse import ChunkFramer, SSEResponse
from quire.server.state import context, server_state
from quire.tokenizer import Tokenizer

router = APIRouter()


def render_chat_prompt(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, list[int]]:
    """The templated prompt and its token ids. Raises ``ValueError`` (a 400) if the template
    rejects the conversation."""
    text = tokenizer.apply_chat_template(
        [m.template_dict() for m in messages],
        add_generation_prompt=add_generation_prompt,
        **(template_kwargs or {}),
    )
    # The template already wrote any BOS token it wants; adding special tokens would double it.
    return text, tokenizer.encode(text, add_special_tokens=False)


class _Formatter:
    """Chat chunk choices: ``{"index", "delta", "logprobs", "finish_reason"}``."""

    def __init__(self, top_logprobs: int | None) -> None:
        self.top_logprobs = top_logprobs

    def opening(self, index: int) -> dict[str, Any] | None:
        return {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }

    def delta(self, index: int, seq: CompletionOutput) -> dict[str, Any]:
        logprobs = None
        if self.top_logprobs is not None and seq.logprobs is not None:
            logprobs = {
                "content": chat_logprobs(seq.token_ids, seq.logprobs, self.top_logprobs),
                "refusal": None,
            }
        return {"index": index, "delta": {"content": seq.text}, "logprobs": logprobs, "finish_reason": None}

    def closing(self, index: int, seq: CompletionOutput) -> dict[str, Any]:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": seq.finish_reason}


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state, ctx = server_state(request), context(request)
    ctx.model, ctx.stream = body.model or state.model_name, body.stream
    state.check_model(body.model)
    body.check_supported()
    top_logprobs = body.num_logprobs()
    params = body.sampling_params(body.max_new_tokens(), top_logprobs)
    client = state.engine()
    assert client.tokenizer is not None and ctx.auth is not None
    text, token_ids = render_chat_prompt(
        client.tokenizer, body.messages, body.add_generation_prompt, body.chat_template_kwargs
    )
    if state.settings.log_prompts:
        ctx.prompt_text = text
    prompt = {"prompt_token_ids": token_ids, "prompt": text}
    gen = submit(state, ctx, ctx.auth, [prompt], params, body.priority, body.stream)
    created = int(time.time())
    head = {"id": f"chatcmpl-{ctx.request_id}", "object": "chat.completion.chunk", "created": created}
    head["model"] = state.model_name
    if body.stream:
        formatter = _Formatter(top_logprobs)
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
        out.append(
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
        )
    payload = {**head, "object": "chat.completion", "choices": out, "usage": gen.usage()}
    return Response(msgspec.json.encode(payload), media_type="application/json")
