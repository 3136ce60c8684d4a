"""``mistral``: Mistral tool calls, both generations of the format.

After the ``[TOOL_CALLS]`` control token (a special token: the output is detokenized with special
tokens kept), either a JSON list (Mistral 7B v0.3, Mixtral, Nemo)::

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]

or, from the v11 tokenizer on (Mistral Small 3.2, Devstral, Magistral), one call per marker with
the name in plain text and an optional ``[CALL_ID]``::

    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

Text before the first marker is content. Mistral's templates require 9-character alphanumeric
call ids in the conversation history, so this parser makes ids of that shape.
"""

from __future__ import annotations

import json
import re
import secrets
import string
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

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# A name never gets this long: past it, text after the marker is not a call header.
_MAX_HEADER_CHARS = 200
_ALNUM = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    """``[TOOL_CALLS][{...}, ...]`` and ``[TOOL_CALLS]name[ARGS]{...}``."""

    name = "mistral"
    keeps_special_tokens = True

    def new_call_id(self) -> str:
        return "".join(secrets.choice(_ALNUM) for _ in range(9))

    def stream(self) -> ToolCallStream:
        return _MistralStream(self.new_call_id)


class _MistralStream(MarkupStream):
    def __init__(self, new_id: Callable[[], str]) -> None:
        super().__init__(new_id)
        self._state = "outside"  # outside | marker | list | args
        self._header = ""  # the raw "name[ARGS]" text, for the content fallback
        self._name = ""
        self._call_id: str | None = None
        self._scan: JsonEnd | None = None

    def _consume(self, final: bool) -> None:
        while True:
            state = self._state
            if state == "content":
                self._content(self._buf)
                self._buf = ""
                return
            if state == "outside":
                before, found, self._buf = split_at_marker(self._buf, TOOL_CALLS, final)
                self._content(before)
                if found is None:
                    return
                self._state = "marker"
            elif state == "marker":
                if not self._after_marker(final):
                    return
            elif not self._json_value(final):
                return

    def _after_marker(self, final: bool) -> bool:
        text = self._buf.lstrip()
        if text.startswith("["):
            self._state, self._scan = "list", JsonEnd()  # the scan skips the spacing before it
            return True
        at = self._buf.find(ARGS)
        if at < 0:
            if final or len(self._buf) > _MAX_HEADER_CHARS:
                self._fallback(TOOL_CALLS + self._buf)
                return False
            return False
        header, name, call_id = self._buf[:at], self._buf[:at].strip(), None
        if CALL_ID in name:
            name, call_id = (part.strip() for part in name.split(CALL_ID, 1))
        if not _NAME.fullmatch(name) or (call_id is not None and not call_id.isalnum()):
            self._fallback(TOOL_CALLS + self._buf)
            return False
        self._header, self._name, self._call_id = header + ARGS, name, call_id
        self._buf, self._state, self._scan = self._buf[at + len(ARGS) :], "args", JsonEnd()
        return True

    def _json_value(self, final: bool) -> bool:
        assert self._scan is not None
        text = self._buf.lstrip()  # spacing before the value: skipped by the scan and by json
        if not text.startswith(("{", "[")):
            if not text and not final:
                return False
            self._fallback(TOOL_CALLS + self._header + self._buf)
            return False
        end = self._scan.find(self._buf)
        if end is None:
            if final:
                self._fallback(TOOL_CALLS + self._header + self._buf)
            return False
        raw, self._buf = self._buf[:end], self._buf[end:]
        value = loads_or_none(raw)
        if self._state == "list":
            calls = (
                [call_from_json(item, ("arguments",)) for item in value] if isinstance(value, list) else []
            )
            if not calls or None in calls:
                self._buf = raw + self._buf
                self._fallback(TOOL_CALLS + self._buf)
                return False
            for call in calls:
                assert call is not None
                self._call(*call)
        else:
            if not isinstance(value, dict):
                self._buf = raw + self._buf
                self._fallback(TOOL_CALLS + self._header + self._buf)
                return False
            self._call(self._name, json.dumps(value, ensure_ascii=False), self._call_id)
        self._state, self._header, self._scan = "outside", "", None
        return True

    def _fallback(self, text: str) -> None:
        # Not a call after all: the marker and everything after it are content.
        self._content(text)
        self._buf, self._state, self._header, self._scan = "", "content", "", None
