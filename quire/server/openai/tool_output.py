"""Tool calls in chat responses, in OpenAI's shape: ``message.tool_calls`` of a whole answer, and
the ``delta.tool_calls`` pieces of a stream (a call's header with its ``id``, ``type`` and
``function.name`` and empty arguments, then argument fragments).

Both come from the same ``ToolCallStream`` of the request's ``ToolPlan``: the whole answer is the
stream fed all the text at once, so a client that assembles the stream gets the same calls.
"""

from __future__ import annotations

from typing import Any

from quire.server.openai.tool_choice import ToolPlan
from quire.structured.tool_parsers import ParserDelta, ToolCallDelta, ToolCallStream, assemble


class StreamedToolCalls:
    """One streaming request's choices, each read through its own ``ToolCallStream``, turned into
    chunk choices (``{"index", "delta", "logprobs", "finish_reason"}``)."""

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._streams: dict[int, ToolCallStream] = {}
        self._called: set[int] = set()

    def feed(self, index: int, text: str) -> list[dict[str, Any]]:
        """Chunks for choice ``index``'s new ``text`` (none while it is held back)."""
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = self._plan.new_stream()
        return self._chunks(index, stream.feed(text))

    def finish(self, index: int) -> list[dict[str, Any]]:
        """Chunks for what choice ``index`` still held back when it finished."""
        stream = self._streams.pop(index, None) or self._plan.new_stream()
        return self._chunks(index, stream.finish())

    def called(self, index: int) -> bool:
        """Whether choice ``index`` has made a call."""
        return index in self._called

    def _chunks(self, index: int, parsed: ParserDelta) -> list[dict[str, Any]]:
        chunks = []
        if parsed.content:
            chunks.append(_chunk(index, {"content": parsed.content}))
        for piece in parsed.tool_calls:
            self._called.add(index)
            last = chunks[-1]["delta"].get("tool_calls") if chunks else None
            if piece.id is None and last and last[0]["index"] == piece.index and "id" not in last[0]:
                last[0]["function"]["arguments"] += piece.arguments  # one fragment per chunk
            else:
                chunks.append(_chunk(index, {"tool_calls": [tool_call_delta(piece)]}))
        return chunks


def _chunk(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


def tool_call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    """A streamed piece of a call: the first names the call (with empty arguments), later ones
    carry argument text."""
    if piece.id is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {
        "index": piece.index,
        "id": piece.id,
        "type": "function",
        "function": {"name": piece.name, "arguments": piece.arguments},
    }


def finish_reason(reason: str | None, called: bool) -> str | None:
    """``tool_calls`` for an output that made calls and ended by itself; ``length`` (cut off)
    and the other reasons unchanged."""
    return "tool_calls" if called and reason == "stop" else reason


def chat_message(text: str, plan: ToolPlan) -> dict[str, Any]:
    """The non-streamed ``message`` for an output ``text``: content, and the calls found in it
    (content is null when the output is only calls)."""
    if not plan.parses_output:
        return {"role": "assistant", "content": text, "refusal": None}
    stream = plan.new_stream()
    parsed = assemble([stream.feed(text), stream.finish()])
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content, "refusal": None}
    if parsed.tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in parsed.tool_calls
        ]
    elif parsed.content is None:
        message["content"] = ""
    return message
