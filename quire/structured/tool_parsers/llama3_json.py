"""``llama3_json``: Llama 3.1 / 3.2 / 3.3 JSON tool calls.

The whole answer is the calls: one JSON object per call, separated by ``;``, optionally after the
``<|python_tag|>`` token (kept in the text only when special tokens are not skipped)::

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

Output that does not start with ``{`` (or the tag) is content. When a call does not parse, it and
everything after it are content; calls before it stand.
"""

from __future__ import annotations

from collections.abc import Callable

from quire.structured.tool_parsers.base import (
    JsonEnd,
    MarkupStream,
    ToolCallStream,
    ToolParser,
    call_from_json,
    loads_or_none,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """``{"name": ..., "parameters": {...}}`` objects separated by ``;``."""

    name = "llama3_json"

    def stream(self) -> ToolCallStream:
        return _Llama3Stream(self.new_call_id)


class _Llama3Stream(MarkupStream):
    def __init__(self, new_id: Callable[[], str]) -> None:
        super().__init__(new_id)
        self._mode = "start"  # start -> calls -> (content)
        self._scan: JsonEnd | None = None
        self._prefix_len = 0  # where the call being scanned starts in the buffer

    def _consume(self, final: bool) -> None:
        if self._mode == "start":
            self._decide(final)
        if self._mode == "calls":
            self._calls_from_buffer(final)
        if self._mode == "content":
            self._content(self._buf)
            self._buf = ""

    def _decide(self, final: bool) -> None:
        text = self._buf.lstrip()
        if not text:
            if final:
                self._mode = "content"
            return
        if text.startswith(PYTHON_TAG) or text.startswith("{"):
            self._mode = "calls"
        elif PYTHON_TAG.startswith(text) and not final:
            return  # may still become the tag
        else:
            self._mode = "content"

    def _calls_from_buffer(self, final: bool) -> None:
        while True:
            text = self._buf.lstrip()
            if text.startswith(PYTHON_TAG):
                text = text[len(PYTHON_TAG) :].lstrip()
            if self._calls and text.startswith(";"):
                text = text[1:].lstrip()
            if not text:
                return  # only separators so far; at the end they are dropped with the other spacing
            if not text.startswith("{"):
                self._mode = "content"
                return
            if self._scan is None:
                self._scan = JsonEnd()
                self._prefix_len = len(self._buf) - len(text)
            end = self._scan.find(self._buf[self._prefix_len :])
            if end is None:
                if final:
                    self._mode = "content"
                return
            end += self._prefix_len
            call = call_from_json(loads_or_none(self._buf[self._prefix_len : end]))
            self._scan = None
            if call is None:
                self._mode = "content"
                return
            self._call(*call)
            self._buf = self._buf[end:]
