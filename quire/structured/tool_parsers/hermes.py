"""``hermes``: Hermes 2 Pro, Qwen2.5 and Qwen3 tool calls.

Each call is a JSON object between tags, as many as the model wants, after optional text::

    Let me check.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A block that is not such an object stays content, tags included. A block cut off at the end of the
output (no closing tag) is still a call if what is there is a complete object, as the model may
stop right after it.
"""

from __future__ import annotations

from collections.abc import Callable

from quire.structured.tool_parsers.base import (
    MarkupStream,
    ToolCallStream,
    ToolParser,
    call_from_json,
    loads_or_none,
    split_at_marker,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks."""

    name = "hermes"

    def stream(self) -> ToolCallStream:
        return _HermesStream(self.new_call_id)


class _HermesStream(MarkupStream):
    def __init__(self, new_id: Callable[[], str]) -> None:
        super().__init__(new_id)
        self._inside = False

    def _consume(self, final: bool) -> None:
        while self._buf:
            if not self._inside:
                before, found, rest = split_at_marker(self._buf, OPEN, final)
                self._content(before)
                self._buf = rest
                if found is None:
                    return
                self._inside = True
                continue
            at = self._buf.find(CLOSE)
            if at < 0:
                if final:
                    self._block(self._buf, closed=False)
                    self._buf = ""
                return
            body, self._buf = self._buf[:at], self._buf[at + len(CLOSE) :]
            self._block(body, closed=True)
            self._inside = False
        if final and self._inside:  # an opening tag with nothing after it
            self._content(OPEN)
            self._inside = False

    def _block(self, body: str, closed: bool) -> None:
        call = call_from_json(loads_or_none(body.strip()), ("arguments",))
        if call is None:
            self._content(OPEN + body + (CLOSE if closed else ""))
        else:
            self._call(*call)
