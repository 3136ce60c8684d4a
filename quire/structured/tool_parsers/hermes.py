"""``hermes``: Hermes 2 Pro, Qwen2.5 and Qwen3 tool calls.

Each call is a JSON object between tags, as many as the model wants, after optional text::

    Let me check.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A block that is not such an object stays content, tags included. A block cut off at the end of the
output (no closing tag) is still a call if what is there is a complete object, as the model may
stop right after it. The block ends where its JSON object ends, so an argument that contains the
closing tag (``{"html": "</tool_call>"}``) does not cut the call short.
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
    split_at_marker,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.

    ``keeps_special_tokens``: some models of the family (Hermes 2 Pro, Hermes 3) make the tags
    special tokens; detokenized without them, the call's JSON would reach the client as content.
    The EOS token that ends the output is not part of the text either way."""

    name = "hermes"
    keeps_special_tokens = True

    def stream(self) -> ToolCallStream:
        return _HermesStream(self.new_call_id)


class _HermesStream(MarkupStream):
    """Outside a block: content up to the next opening tag. Inside: a block that starts with
    ``{`` ends with the JSON object, so a closing tag written inside one of its strings does not
    end it; what does not fit that (no object, text between the object and the closing tag, an
    object that never closes) ends at the first closing tag, as markup that becomes content."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        super().__init__(new_id)
        self._inside = False
        self._scan: JsonEnd | None = None  # over the block's object, from its "{"
        self._object_end: int | None = None  # where the scan found it to end

    def _consume(self, final: bool) -> None:
        while self._buf:
            if not self._inside:
                before, found, rest = split_at_marker(self._buf, OPEN, final)
                self._content(before)
                self._buf = rest
                if found is None:
                    return
                self._inside, self._scan, self._object_end = True, None, None
                continue
            if not self._take_block(final):
                return
        if final and self._inside:  # an opening tag with nothing after it
            self._content(OPEN)
            self._inside = False

    def _take_block(self, final: bool) -> bool:
        """Take the block at the front of the buffer off it; False while it is still open."""
        text = self._buf
        start = len(text) - len(text.lstrip())
        if start == len(text):  # only spacing so far
            if final:
                self._end_block(len(text), closed=False)
            return final
        if text[start] == "{":
            if self._object_end is None:
                self._scan = self._scan or JsonEnd()
                found = self._scan.find(text[start:])
                self._object_end = None if found is None else start + found
            end = self._object_end
            if end is not None:
                after = text[end:]
                close_at = end + len(after) - len(after.lstrip())
                tail = text[close_at:]
                if tail.startswith(CLOSE):
                    self._end_block(close_at, closed=True)
                    return True
                if not tail and final:  # the model stopped right after the object
                    self._end_block(len(text), closed=False)
                    return True
                if CLOSE.startswith(tail) and not final:
                    return False  # the closing tag may be on its way
            elif not final:
                return False
        at = text.find(CLOSE)
        if at >= 0:
            self._end_block(at, closed=True)
            return True
        if final:
            self._end_block(len(text), closed=False)
        return final

    def _end_block(self, size: int, closed: bool) -> None:
        body = self._buf[:size]
        self._buf = self._buf[size + (len(CLOSE) if closed else 0) :]
        self._inside, self._scan, self._object_end = False, None, None
        call = call_from_json(loads_or_none(body.strip()), ("arguments",))
        if call is None:
            self._content(OPEN + body + (CLOSE if closed else ""))
        else:
            self._call(*call)
