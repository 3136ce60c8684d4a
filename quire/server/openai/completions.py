"""``POST /v1/completions``: text completion, OpenAI's legacy shape (streaming or not)."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from starlette.responses import Response

from quire.sampling import CompletionOutput
from quire.server.openai.admission import submit
from quire.server.openai.logprobs import completion_logprobs
from quire.server.openai.protocol import CompletionRequest
from quire.server.openai.streaming import collect_choices, stream_chunks
from quire.server.sse import ChunkFramer, SSEResponse
from quire.server.state import context, server_state

router = APIRouter()


class _Formatter:
    """Completion choices: ``{"text", "index", "logprobs", "finish_reason"}``."""

    def __init__(self, want_logprobs: bool, echo: list[str] | None) -> None:
        self.want_logprobs = want_logprobs
        self.echo = echo  # per choice: the prompt text to put before its first delta
        self.offsets: dict[int, int] = {}

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def delta(self, index: int, seq: CompletionOutput) -> dict[str, Any]:
        text = seq.text
        if self.echo is not None and self.echo[index]:
            text, self.echo[index] = self.echo[index] + text, ""
        logprobs = None
        if self.want_logprobs and seq.logprobs is not None:
            logprobs, self.offsets[index] = completion_logprobs(
                seq.token_ids, seq.logprobs, self.offsets.get(index, 0)
            )
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": None}

    def closing(self, index: int, seq: CompletionOutput) -> dict[str, Any]:
        return {"text": "", "index": index, "logprobs": None, "finish_reason": seq.finish_reason}


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state, ctx = server_state(request), context(request)
    ctx.model, ctx.stream = body.model or state.model_name, body.stream
    state.check_model(body.model)
    body.check_supported()
    defaults = state.settings.sampling_defaults
    params = body.sampling_params(body.max_new_tokens(defaults), body.logprobs, defaults)
    if state.settings.log_prompts:
        ctx.prompt_text = body.prompt
    assert ctx.auth is not None
    gen = await submit(state, ctx, ctx.auth, body.prompts(), params, body.priority, body.stream)
    head = {"id": f"cmpl-{ctx.request_id}", "object": "text_completion", "created": int(time.time())}
    head["model"] = state.model_name
    echo = None
    if body.echo:
        try:
            echo = [_prompt_text(state, job.processed) for job in gen.jobs for _ in range(params.n)]
        except BaseException:
            gen.close("error")  # admitted: the engine requests must not outlive this failure
            raise
    if body.stream:
        formatter = _Formatter(body.logprobs is not None, echo)
        return SSEResponse(
            stream_chunks(gen, ChunkFramer(head, body.include_usage), formatter, body.include_usage)
        )

    choices = await collect_choices(request, gen)
    out = []
    for choice in choices:
        logprobs = None
        if choice.logprobs is not None:
            logprobs, _ = completion_logprobs(choice.token_ids, choice.logprobs, 0)
        text = choice.text if echo is None else echo[choice.index] + choice.text
        out.append(
            {
                "text": text,
                "index": choice.index,
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
        )
    payload = {**head, "choices": out, "usage": gen.usage()}
    return Response(msgspec.json.encode(payload), media_type="application/json")


def _prompt_text(state, processed) -> str:
    if processed.prompt is not None:
        return processed.prompt
    tokenizer = state.client.tokenizer
    return tokenizer.decode(processed.token_ids) if tokenizer is not None else ""
