"""Chat templates: Jinja2 programs shipped with a model that turn a list of messages into a prompt.

Templates come from the Hub, so they are untrusted code: they run in jinja2's immutable sandbox
and only ever see plain JSON-like copies of the caller's data. The environment is configured the
way ``transformers`` configures it (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, the same
helper functions), because templates are written against that behaviour and a single differing
whitespace rule changes the prompt the model was trained on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import jinja2.utils

from quire.tokenizer.template_limits import BoundedSandbox, RenderLimits, TemplateLimitError

# Names a message's reasoning arrives under. Templates read `reasoning_content` (most) or
# `thinking` (gpt-oss), so both are filled from whichever the caller used, as transformers does.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# Template variables set from render()'s own arguments; extra variables may not replace them, nor
# the special tokens or the environment's functions.
_ARGUMENT_VARIABLES = frozenset(("messages", "add_generation_prompt", "tools"))
# What a server request's template kwargs may not set: the above, plus the variables that
# transformers' apply_chat_template takes as arguments (a request has no say in them).
FIXED_VARIABLES = _ARGUMENT_VARIABLES | {"documents", "continue_final_message", "tokenize"}


class ChatTemplates:
    """The named chat templates of one tokenizer, compiled on first use.

    ``templates`` maps a name to Jinja source; ``"default"`` is used unless tools are given and a
    ``"tool_use"`` template exists. ``special_tokens`` (``bos_token``, ``eos_token``, ...) are put
    in every template's context.
    """

    def __init__(
        self,
        templates: Mapping[str, str],
        special_tokens: Mapping[str, str],
        source: str,
        limits: RenderLimits | None = None,
    ) -> None:
        self._templates = dict(templates)
        self._special_tokens = dict(special_tokens)
        self._source = source
        self._limits = limits or RenderLimits()
        self._env = _make_environment(self._limits)
        self._compiled: dict[str, jinja2.Template] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._templates))

    def get(self, name: str = "default") -> str | None:
        return self._templates.get(name)

    def check(self) -> None:
        """Compile every template now; raises ``ValueError`` for one that is not valid Jinja."""
        for name in self._templates:
            self._compile(name)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        tools: Sequence[Mapping[str, Any]] | None,
        chat_template: str | None,
        extra: Mapping[str, Any],
    ) -> str:
        """The prompt; raises ``ValueError`` for bad input, a template's own rejection, or a render
        past its :class:`RenderLimits` (:class:`TemplateLimitError`)."""
        self._check_extra(extra)
        template = self._select(tools is not None, chat_template)
        context: dict[str, Any] = {**self._special_tokens, **_to_template_data(dict(extra), "extra")}
        # transformers always defines these two, even as None; templates test `tools is not none`,
        # which is true for an undefined variable, so leaving them out would change the output.
        context.setdefault("documents", None)
        context["tools"] = _validate_tools(tools)
        context["messages"] = _validate_messages(messages)
        context["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return self._env.render(template, context)
        except TemplateLimitError:
            raise
        except jinja2.TemplateError as exc:
            # raise_exception() in a template is how models reject a conversation (bad role order,
            # unsupported content); the caller gets that message as a ValueError to report.
            raise ValueError(f"chat template rejected the conversation: {exc}") from exc
        except RecursionError:
            raise ValueError("chat template failed: it recursed too deeply") from None
        except Exception as exc:  # the template is data, not our code: any failure is the input's
            raise ValueError(
                f"chat template failed on these messages ({type(exc).__name__}: {exc}); "
                "check that each message's fields have the types this model's template expects"
            ) from exc

    def _check_extra(self, extra: Mapping[str, Any]) -> None:
        fixed = _ARGUMENT_VARIABLES | self._special_tokens.keys() | self._env.globals.keys()
        for name in extra:
            if name in fixed:
                raise ValueError(
                    f"chat template argument {name!r} is set by the caller's own parameters or the "
                    "tokenizer and cannot be overridden; remove it from the template arguments"
                )

    def _select(self, has_tools: bool, chat_template: str | None) -> jinja2.Template:
        if chat_template is not None:
            if chat_template in self._templates:
                return self._compile(chat_template)
            # Not a name: a literal template from the caller. Not cached, so that templates sent
            # with requests cannot grow memory without bound.
            if len(chat_template) > self._limits.max_source_chars:
                raise TemplateLimitError(
                    f"the chat_template argument has {len(chat_template)} characters; the limit is "
                    f"{self._limits.max_source_chars}"
                )
            return _compile_source(self._env, chat_template, "the chat_template argument")
        if not self._templates:
            raise ValueError(
                f"the tokenizer at {self._source} has no chat template (none in tokenizer_config.json "
                "or chat_template.jinja); pass chat_template=... or send a plain completion prompt"
            )
        if has_tools and "tool_use" in self._templates:
            return self._compile("tool_use")
        if "default" in self._templates:
            return self._compile("default")
        raise ValueError(
            f"the tokenizer at {self._source} has chat templates named {', '.join(self.names)} but none "
            "named 'default'; pass chat_template=<name> to pick one"
        )

    def _compile(self, name: str) -> jinja2.Template:
        compiled = self._compiled.get(name)
        if compiled is None:
            compiled = _compile_source(
                self._env, self._templates[name], f"chat template {name!r} of {self._source}"
            )
            self._compiled[name] = compiled
        return compiled


def read_template_argument(value: str) -> str:
    """A ``--chat-template`` value: the path of a template file, or the template itself (anything
    with a Jinja tag or expression). Raises ``ValueError`` for a path that does not exist."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # a template long enough to be an invalid path name
        is_file = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read chat template {value!r}: {exc}") from None
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(
        f"chat template {value!r} is neither an existing file nor a Jinja template "
        "(a template contains {{ ... }} or {% ... %})"
    )


def _compile_source(env: jinja2.Environment, source: str, what: str) -> jinja2.Template:
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{what} is not valid Jinja (line {exc.lineno}: {exc.message})") from exc
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to compile") from None


def _make_environment(limits: RenderLimits) -> BoundedSandbox:
    env = BoundedSandbox(
        limits, trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _GuardedNamespace
    # A function rather than the `dict` type, so templates get no handle on a class object.
    env.globals["dict"] = _make_dict
    env.bound_filters()
    return env


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML, which would put "\u003c" into prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)


class _GuardedNamespace(jinja2.utils.Namespace):
    """jinja's ``namespace()``, refusing underscore names that could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - `self` may also be a keyword, as in jinja
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        super().__setitem__(name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates may not use underscore names on a namespace: {name!r}"
        )


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}``, the marker transformers uses for
    assistant-token masks, and renders its body unchanged (serving never needs the mask)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        # A call block, like transformers' extension, so the body gets the same (macro) scoping.
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise ValueError("messages must not be empty; a chat needs at least one message")
    checked = []
    for index, raw in enumerate(messages):
        message = _to_template_data(raw, f"messages[{index}]")
        if not isinstance(message, dict):
            raise ValueError(
                f"messages[{index}] must be a dict with 'role' and 'content', got {type(raw).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(
                f"messages[{index}] needs a 'role' string such as 'system', 'user' or 'assistant', got {role!r}"
            )
        # An assistant message that only calls tools legitimately has no content (OpenAI sends null).
        if "content" not in message and not message.get("tool_calls"):
            raise ValueError(
                f"messages[{index}] (role {role!r}) has no 'content'; give a string or a list of content parts"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ValueError(
                f"messages[{index}] content must be a string, a list of content parts or null, "
                f"got {type(content).__name__}"
            )
        checked.append(_alias_reasoning(message))
    return checked


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[key] for key in _REASONING_KEYS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _validate_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
    converted = [_to_template_data(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    for index, tool in enumerate(converted):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{index}] must be a JSON-schema dict, got {type(tools[index]).__name__}")
    return converted


def _to_template_data(value: Any, where: str) -> Any:
    """A plain copy of ``value`` built from JSON types (plus tuples), so that the sandboxed template
    can neither mutate the caller's objects nor call methods of rich ones (pydantic, enums, ...)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Exact base types: subclasses (str/int enums) could carry extra methods into the sandbox.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_to_template_data(k, where): _to_template_data(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_template_data(item, where) for item in value]
    if isinstance(value, tuple):
        return tuple(_to_template_data(item, where) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_template_data(getattr(value, f.name), where) for f in dataclasses.fields(value)}
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):  # pydantic models, e.g. the server's request types
        return _to_template_data(model_dump(), where)
    raise ValueError(
        f"{where} contains a {type(value).__name__}; chat template inputs must be JSON-like "
        "(dicts, lists, strings, numbers, booleans, null)"
    )
