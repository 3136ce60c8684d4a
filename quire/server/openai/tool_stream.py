"""Tool calls out of grammar-constrained output (``tool_choice`` "required" or a named function).

The grammar makes the output JSON of a known shape (see ``tool_schema.py``), so these streams
need no markers: they follow the JSON character by character, tracking depth and strings, and
pass argument text on as the model writes it. The first piece of each call carries its id and
name (and empty arguments), as OpenAI streams calls; the non-streamed answer is the same stream
fed the whole text, so both always agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from quire.structured.tool_parsers import ParserDelta, ToolCallDelta, ToolCallStream


class _JsonValue:
    """Where a JSON value stands as its characters arrive: ``feed`` says when it is complete.
    Compound values and strings end at their closing character; a bare scalar ends at the first
    character that cannot belong to it, which ``feed`` then reports as not consumed."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False
        self.scalar = False

    def feed(self, char: str) -> tuple[bool, bool]:
        """``(consumed, complete)`` after looking at ``char``."""
        if not self.started:
            if char.isspace():
                return True, False
            self.started = True
            if char == '"':
                self.in_string = True
                return True, False
            if char in "{[":
                self.depth = 1
                return True, False
            self.scalar = True
            return True, False
        if self.scalar:
            if char in ",}] \t\r\n":
                return False, True
            return True, False
        if self.in_string:
            if self.escape:
                self.escape = False
            elif char == "\\":
                self.escape = True
            elif char == '"':
                self.in_string = False
                return True, self.depth == 0
            return True, False
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            return True, self.depth == 0
        return True, False


class NamedCallStream(ToolCallStream):
    """The output is the arguments of one known function."""

    def __init__(self, name: str, call_id: str) -> None:
        self._name = name
        self._id = call_id
        self._announced = False
        self._value = _JsonValue()
        self._done = False

    def feed(self, text: str) -> ParserDelta:
        out = ParserDelta()
        if not self._announced:
            self._announced = True
            out.tool_calls.append(ToolCallDelta(0, id=self._id, name=self._name))
        piece = []
        for char in text:
            if self._done:
                break
            consumed, complete = self._value.feed(char)
            if consumed and self._value.started:
                piece.append(char)
            self._done = complete
        if piece:
            out.tool_calls.append(ToolCallDelta(0, arguments="".join(piece)))
        return out

    def finish(self) -> ParserDelta:
        return self.feed("")


class RequiredCallsStream(ToolCallStream):
    """The output is ``[{"name": ..., "arguments": {...}}, ...]``."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self._state = "before_array"
        self._index = -1
        self._key: list[str] = []
        self._key_escape = False
        self._name: list[str] = []
        self._value: _JsonValue | None = None
        self._value_key = ""
        self._announced = False
        self._pending: list[str] = []  # arguments written before the name (not in our schema's order)
        self._out = ParserDelta()
        self._args: list[str] = []

    def feed(self, text: str) -> ParserDelta:
        self._out = ParserDelta()
        for char in text:
            self._step(char)
        self._flush_args()
        return self._out

    def finish(self) -> ParserDelta:
        return self.feed("")

    def _step(self, char: str) -> None:
        state = self._state
        if state == "before_array":
            if char == "[":
                self._state = "between"
        elif state == "between":
            if char == "{":
                self._index += 1
                self._announced = False
                self._pending = []
                self._state = "key_wait"
            elif char == "]":
                self._state = "done"
        elif state == "key_wait":
            if char == '"':
                self._key, self._key_escape = [], False
                self._state = "key"
            elif char == "}":
                self._flush_args()
                self._state = "between"
        elif state == "key":
            self._string_char(char, self._key, "colon")
        elif state == "colon":
            if char == ":":
                self._value_key = _decode_string(self._key)
                self._value = _JsonValue()
                self._state = "value"
        elif state == "name":
            self._string_char(char, self._name, "key_wait")
            if self._state == "key_wait":
                self._announce(_decode_string(self._name))
        elif state == "value":
            self._value_char(char)

    def _string_char(self, char: str, into: list[str], next_state: str) -> None:
        if self._key_escape:
            self._key_escape = False
        elif char == "\\":
            self._key_escape = True
        elif char == '"':
            self._state = next_state
            return
        into.append(char)

    def _value_char(self, char: str) -> None:
        value = self._value
        assert value is not None
        if self._value_key == "name" and not value.started and char == '"':
            self._name, self._key_escape = [], False
            self._state = "name"
            return
        consumed, complete = value.feed(char)
        if consumed and value.started and self._value_key == "arguments":
            (self._args if self._announced else self._pending).append(char)
        if complete:
            self._state = "key_wait"
            if not consumed:
                self._step(char)

    def _announce(self, name: str) -> None:
        self._flush_args()
        self._out.tool_calls.append(ToolCallDelta(self._index, id=self._new_id(), name=name))
        self._announced = True
        self._args.extend(self._pending)
        self._pending = []

    def _flush_args(self) -> None:
        if self._args:
            self._out.tool_calls.append(ToolCallDelta(self._index, arguments="".join(self._args)))
            self._args = []


def _decode_string(raw: list[str]) -> str:
    """The text of a JSON string's raw characters (escapes resolved; left raw if malformed)."""
    text = "".join(raw)
    try:
        return json.loads(f'"{text}"')
    except ValueError:
        return text
