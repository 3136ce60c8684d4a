"""What every tool-call parser shares: the output types, the parser interface, and the streaming
machinery that keeps tool-call markup out of content.

A parser is defined by its streaming side: ``ToolCallStream.feed`` takes the model's text deltas and
returns content and tool-call deltas; ``finish`` flushes what was held back. The one-shot
``ToolParser.parse`` is the stream fed the whole text, so a streamed answer assembles into exactly
the calls and content of the non-streamed one.

Content rules, the same for every format: text with no tool-call markup is content unchanged (byte
for byte); markup that does not parse (a malformed call, a call cut off at the end) is content too;
whitespace that only separates calls from each other or from the content is dropped, so an output
that is only calls has no content (``None``).
"""

from __future__ import annotations

import json
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

_ALNUM = string.ascii_letters + string.digits


def openai_call_id() -> str:
    """``call_`` plus 24 random alphanumerics, the shape of OpenAI's tool-call ids."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    """One complete call: ``arguments`` is JSON text (a JSON object for well-formed calls)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of call ``index``: the first piece of a call carries ``id`` and ``name`` (and empty
    ``arguments``), later pieces carry only argument text, in order."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParserDelta:
    """What one ``feed`` or ``finish`` produced: content text and tool-call pieces."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def extend(self, other: ParserDelta) -> None:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


@dataclass(frozen=True)
class ParsedOutput:
    """A whole output split into content (None when there is none) and tool calls."""

    content: str | None
    tool_calls: list[ToolCall]


def assemble(deltas: list[ParserDelta]) -> ParsedOutput:
    """Join deltas the way a client joins streamed chunks: content concatenated, each call's pieces
    merged by ``index``."""
    content = "".join(delta.content for delta in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": []})
            if piece.id is not None:
                call["id"] = piece.id
            if piece.name is not None:
                call["name"] = piece.name
            call["arguments"].append(piece.arguments)
    tool_calls = [
        ToolCall(call["id"], call["name"], "".join(call["arguments"])) for _, call in sorted(calls.items())
    ]
    return ParsedOutput(content or None, tool_calls)


class ToolCallStream(ABC):
    """The per-output state of a parser: feed it text deltas in order, then call ``finish`` once."""

    @abstractmethod
    def feed(self, text: str) -> ParserDelta:
        """Content and call pieces that ``text`` (with what was held back before) made certain."""

    @abstractmethod
    def finish(self) -> ParserDelta:
        """Everything still held back: a call that turned out complete, or content."""


class ToolParser(ABC):
    """One model family's tool-call output format, registered under its ``--tool-call-parser`` name.

    ``keeps_special_tokens``: the format's markers are special tokens (Mistral's ``[TOOL_CALLS]``),
    so the output must be detokenized with them for the parser to see them."""

    name: ClassVar[str]
    keeps_special_tokens: ClassVar[bool] = False

    def new_call_id(self) -> str:
        """A fresh id for a call this parser found (formats with their own id rules override it)."""
        return openai_call_id()

    @abstractmethod
    def stream(self) -> ToolCallStream:
        """Fresh state for parsing one output."""

    def parse(self, text: str) -> ParsedOutput:
        """Split a complete output into content and calls (the stream fed ``text`` at once)."""
        stream = self.stream()
        return assemble([stream.feed(text), stream.finish()])


class MarkupStream(ToolCallStream):
    """Shared streaming machinery: subclasses consume ``self._buf`` in ``_consume`` and report what
    they find with ``_content`` and ``_call``; text they leave in ``_buf`` is held back.

    Whitespace is held back as well until the next non-whitespace content: dropped when a call
    follows it (or when the output ends after calls), passed on otherwise, so output without calls
    comes out unchanged, and text on both sides of a call keeps the spacing after the call."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self._buf = ""
        self._held_space = ""
        self._has_content = False
        self._calls = 0
        self._out = ParserDelta()

    def feed(self, text: str) -> ParserDelta:
        self._buf += text
        return self._run(final=False)

    def finish(self) -> ParserDelta:
        out = self._run(final=True)
        if self._calls == 0:
            out.content += self._held_space
        self._held_space = ""
        return out

    def _run(self, final: bool) -> ParserDelta:
        self._out = ParserDelta()
        self._consume(final)
        if final and self._buf:
            self._content(self._buf)
            self._buf = ""
        return self._out

    @abstractmethod
    def _consume(self, final: bool) -> None:
        """Take what is decided off the front of ``self._buf``; at ``final`` take everything."""

    def _content(self, text: str) -> None:
        if self._calls and not self._has_content:
            text = text.lstrip()  # after calls, with no content yet to separate it from
        body = text.rstrip()
        if body:
            self._out.content += self._held_space + body
            self._held_space = text[len(body) :]
            self._has_content = True
        else:
            self._held_space += text

    def _call(self, name: str, arguments: str, call_id: str | None = None) -> None:
        index = self._calls
        self._calls += 1
        self._held_space = ""
        self._out.tool_calls.append(ToolCallDelta(index, id=call_id or self._new_id(), name=name))
        self._out.tool_calls.append(ToolCallDelta(index, arguments=arguments))


def held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker`` (to hold back)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def split_at_marker(text: str, marker: str, final: bool) -> tuple[str, str | None, str]:
    """``(before, found, after)``: ``found`` is ``marker`` when ``text`` contains it; otherwise
    ``before`` is the text that surely precedes any marker and ``after`` what is held back."""
    at = text.find(marker)
    if at >= 0:
        return text[:at], marker, text[at + len(marker) :]
    keep = 0 if final else held_prefix(text, marker)
    return text[: len(text) - keep], None, text[len(text) - keep :]


class JsonEnd:
    """Finds where a JSON object or array that starts at the beginning of a growing text ends,
    resuming where the previous call stopped (each character is looked at once)."""

    def __init__(self) -> None:
        self._pos = 0
        self._depth = 0
        self._in_string = False
        self._escape = False

    def find(self, text: str) -> int | None:
        """The index just past the value's last character, or None while it is still open."""
        for i in range(self._pos, len(text)):
            char = text[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif char == "\\":
                    self._escape = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self._pos = i + 1
                    return i + 1
        self._pos = len(text)
        return None


def call_from_json(
    data: Any, argument_keys: tuple[str, ...] = ("arguments", "parameters")
) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` of a ``{"name": ..., "arguments": {...}}`` object, or None if
    ``data`` is not one (then the text it came from stays content)."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    # Exactly a name and the arguments: a JSON answer that merely has a "name" field is content.
    present = [key for key in argument_keys if key in data]
    if len(present) != 1 or len(data) != 2:
        return None
    arguments = data[present[0]]
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return data["name"], json.dumps(arguments, ensure_ascii=False)


def loads_or_none(text: str) -> Any:
    """``json.loads(text)``, or None for text that is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None
