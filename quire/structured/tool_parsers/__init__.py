"""Tool-call output parsers, by vLLM's ``--tool-call-parser`` names; a new format is one file
with a ``ToolParser`` subclass, listed in ``_PARSERS``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from quire.structured.tool_parsers.base import (
    ParsedOutput,
    ParserDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolParser,
    assemble,
    openai_call_id,
)
from quire.structured.tool_parsers.hermes import HermesToolParser
from quire.structured.tool_parsers.llama3_json import Llama3JsonToolParser
from quire.structured.tool_parsers.mistral import MistralToolParser

_PARSERS: Mapping[str, type[ToolParser]] = MappingProxyType(
    {cls.name: cls for cls in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)}
)


def tool_parser_names() -> tuple[str, ...]:
    """The registered ``--tool-call-parser`` names."""
    return tuple(sorted(_PARSERS))


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as ``name``; ValueError naming the known ones otherwise."""
    cls = _PARSERS.get(name)
    if cls is None:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(tool_parser_names())}")
    return cls()


__all__ = [
    "ParsedOutput",
    "ParserDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStream",
    "ToolParser",
    "assemble",
    "get_tool_parser",
    "openai_call_id",
    "tool_parser_names",
]
