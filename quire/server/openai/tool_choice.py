"""What a chat request does with its ``tools``: ``tool_choice`` decided once, before the render.

- ``"none"``: the model answers in text; nothing is parsed. The tools are still shown to the chat
  template, as vLLM does by default (the model keeps seeing the conversation's tool context,
  which is what the turn after a tool result needs).
- ``"auto"`` (the default when tools are given, as in OpenAI's and vLLM's API): the model writes
  freely and the server's ``--tool-call-parser`` finds calls in the output. Needs
  ``--enable-auto-tool-choice`` and ``--tool-call-parser``; without them a 400 says so, as vLLM.
- ``"required"`` and a named function: enforced by the grammar engine (``tool_schema.py``), so
  the call is always valid JSON matching the function's schema; the output is read by
  ``tool_stream.py``.

Tool calls and a JSON ``response_format`` / ``structured_outputs`` constraint cannot both shape
one output, so asking for both (unless ``tool_choice`` is ``"none"``) is a 400; under ``"auto"`` a
regex or grammar constraint is allowed, as it only shapes the text the parser reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from quire.sampling import SamplingParams
from quire.server.errors import APIError
from quire.server.openai.tool_schema import named_call_schema, required_calls_schema
from quire.server.openai.tool_stream import NamedCallStream, RequiredCallsStream
from quire.structured.params import StructuredOutputsParams
from quire.structured.tool_parsers import (
    ParserDelta,
    ToolCallStream,
    ToolParser,
    get_tool_parser,
    openai_call_id,
    tool_parser_names,
)

if TYPE_CHECKING:
    from quire.server.openai.protocol import ChatCompletionRequest, FunctionTool
    from quire.server.settings import ServerSettings

Mode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    """A request's tool handling: ``template_tools`` for the chat template (None: no tools),
    ``mode``, the ``parser`` for ``auto``, the ``function`` a named choice calls, and whether
    several calls may come at once (``parallel``)."""

    template_tools: list[dict[str, Any]] | None = None
    mode: Mode = "none"
    tools: tuple[FunctionTool, ...] = ()
    parser: ToolParser | None = None
    function: str | None = None
    parallel: bool = True

    @property
    def parses_output(self) -> bool:
        return self.mode != "none"

    def new_call_id(self) -> str:
        return self.parser.new_call_id() if self.parser is not None else openai_call_id()

    def new_stream(self) -> ToolCallStream:
        """Fresh parsing state for one choice (only when ``parses_output``)."""
        if self.mode == "auto":
            assert self.parser is not None
            stream = self.parser.stream()
            return stream if self.parallel else FirstCallOnly(stream)
        if self.mode == "named":
            assert self.function is not None
            return NamedCallStream(self.function, self.new_call_id())
        return RequiredCallsStream(self.new_call_id)

    def apply(self, params: SamplingParams) -> SamplingParams:
        """``params`` with what this plan needs: the grammar of an enforced choice, special
        tokens kept for a parser whose markers are special tokens. 400 when the request's own
        output constraint conflicts with tool calls."""
        if self.mode == "none":
            return params
        constraint = params.structured_outputs
        # Under "auto" a regex or grammar only shapes the text the parser then reads (it may even
        # spell out a call); a JSON answer format leaves a call no room, as does any constraint
        # under an enforced choice, whose own grammar is the call.
        if constraint is not None and (self.mode != "auto" or constraint.kind in ("json", "json_object")):
            choice = self.function if self.mode == "named" else self.mode
            raise APIError.invalid_request(
                f'tool_choice "{choice}" and an output constraint (response_format, structured_outputs '
                "or guided_*) cannot both shape this answer: the tool call is the answer. Send one of "
                'them, or tool_choice "none" to answer in the requested format.',
                param="tool_choice",
            )
        if self.mode == "auto":
            assert self.parser is not None
            if self.parser.keeps_special_tokens and params.skip_special_tokens:
                return dataclasses.replace(params, skip_special_tokens=False)
            return params
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.function)
            schema = named_call_schema(tool.function)
        else:
            schema = required_calls_schema([t.function for t in self.tools], self.parallel)
        return dataclasses.replace(params, structured_outputs=StructuredOutputsParams(json=schema))


def plan_tools(body: ChatCompletionRequest, settings: ServerSettings) -> ToolPlan:
    """The request's ``ToolPlan``; a 400 ``APIError`` for a choice it cannot have."""
    tools = body.tools or []
    choice = body.tool_choice
    if not tools:
        if choice is not None and choice != "none":
            raise APIError.invalid_request(
                "tool_choice needs tools: give the functions in 'tools', or leave tool_choice out",
                param="tool_choice",
            )
        return ToolPlan()
    names = [tool.function.name for tool in tools]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise APIError.invalid_request(
            f"tools define the function {duplicate!r} more than once; give each function a unique name",
            param="tools",
        )
    template_tools = [tool.model_dump(exclude_unset=True) for tool in tools]
    parallel = body.parallel_tool_calls is not False
    common = {"template_tools": template_tools, "tools": tuple(tools), "parallel": parallel}
    if choice == "none":
        return ToolPlan(**common)
    if choice == "required":
        return ToolPlan(mode="required", **common)
    if choice is None or choice == "auto":
        return ToolPlan(mode="auto", parser=_auto_parser(settings), **common)
    if choice.function.name not in names:
        raise APIError.invalid_request(
            f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
            f"({', '.join(names)})",
            param="tool_choice.function.name",
        )
    return ToolPlan(mode="named", function=choice.function.name, **common)


def _auto_parser(settings: ServerSettings) -> ToolParser:
    missing = [
        flag
        for flag, given in (
            ("--enable-auto-tool-choice", settings.enable_auto_tool_choice),
            ("--tool-call-parser NAME", settings.tool_call_parser is not None),
        )
        if not given
    ]
    if missing:
        raise APIError.invalid_request(
            'tool_choice "auto" (the default when tools are given) needs the server started with '
            f"--enable-auto-tool-choice and --tool-call-parser NAME (the model's tool-call format, one "
            f"of {', '.join(tool_parser_names())}); this one lacks {' and '.join(missing)}. Or send "
            'tool_choice "required", {"type": "function", "function": {"name": ...}} or "none".',
            param="tool_choice",
        )
    assert settings.tool_call_parser is not None
    return get_tool_parser(settings.tool_call_parser)


class FirstCallOnly(ToolCallStream):
    """``parallel_tool_calls: false`` under ``auto``: the first call is kept, later ones dropped
    (their text too, so it cannot reappear as content)."""

    def __init__(self, inner: ToolCallStream) -> None:
        self._inner = inner

    def feed(self, text: str) -> ParserDelta:
        return self._keep_first(self._inner.feed(text))

    def finish(self) -> ParserDelta:
        return self._keep_first(self._inner.finish())

    @staticmethod
    def _keep_first(delta: ParserDelta) -> ParserDelta:
        delta.tool_calls = [piece for piece in delta.tool_calls if piece.index == 0]
        return delta
