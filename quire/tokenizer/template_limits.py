"""Bounds on the work one chat-template render may do.

A chat template is a program. One sent with a request (accepted only when the operator trusts
request templates) or shipped in a hostile checkpoint can loop, recurse or build huge strings, and
a thread running it cannot be killed from outside, so the render bounds itself:

* **time**: the compiled template checks a deadline at the start of every block body (each loop
  iteration, each macro call, each branch taken), and so does every call, operator, attribute or
  item access and filter the sandbox mediates, including those a filter such as ``map`` makes per
  item; past the deadline the render aborts;
* **output**: the render streams its chunks and stops once their total passes a limit;
* **single steps**, which no line-level check can interrupt: ``range`` is capped; integer
  arguments of functions, methods and filters (widths of ``center``, ``ljust``, ``slice``...) and
  widths in format strings are bounded; and every step that can build a string much larger than
  its inputs in one C call (``* + % **``, ``~``, printing a value, ``join``, ``replace``,
  ``indent``, ``tojson``, ``format``...) estimates its result first and refuses past the output
  limit. The strings steps build are also charged to a per-render budget, so that a loop of
  individually small steps cannot fill memory before the deadline.

Breaking a limit raises :class:`TemplateLimitError` (a ``ValueError``) naming the limit.
"""

from __future__ import annotations

import functools
import inspect
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.nodes
import jinja2.sandbox

# Integers may grow this large (in bits) through * and **; chat templates only ever count.
_MAX_INT_BITS = 1 << 16
# Results shorter than this are not charged to the render's work budget.
_CHARGE_FROM = 256

_PERCENT_SPEC = re.compile(r"%[#0\- +]*(\d*)(?:\.(\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")
_DIGITS = re.compile(r"\d+")


class TemplateLimitError(ValueError):
    """A chat-template render went past one of its :class:`RenderLimits`."""


@dataclass(frozen=True)
class RenderLimits:
    """What one chat-template render may use.

    ``max_seconds``: wall time of one render. ``max_output_chars``: length of the rendered prompt,
    and of any single string or list one template step builds. ``max_work_chars``: total length of
    the strings those steps build over the render (bounds memory). ``max_range``: items of one
    ``range()``. ``max_items``: items of a list or tuple built with ``+`` or ``*``, and of a
    sequence a filter walks item by item in Python (``sort``, ``unique``, ``groupby``...).
    ``max_int_argument``: largest integer passed to a function, method or filter,
    and largest width in a format string. ``max_source_chars``: length of a template given as
    source with a call (templates shipped with the model are not limited).
    """

    max_seconds: float = 2.0
    max_output_chars: int = 8 << 20
    max_work_chars: int = 128 << 20
    max_range: int = 10_000
    max_items: int = 100_000
    max_int_argument: int = 1 << 16
    max_source_chars: int = 256 << 10

    def __post_init__(self) -> None:
        if not 0 < self.max_seconds < float("inf"):
            raise ValueError(f"max_seconds must be a positive number, got {self.max_seconds}")
        for name in (
            "max_output_chars",
            "max_work_chars",
            "max_range",
            "max_items",
            "max_int_argument",
            "max_source_chars",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_work_chars < self.max_output_chars:
            raise ValueError("max_work_chars must be at least max_output_chars")


class _Budget:
    """The state of one render: its deadline and the characters its steps built."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_seconds
        self.work = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(
                f"chat template rendering exceeded its time limit of {self.limits.max_seconds:g} s"
            )

    def charge(self, chars: int) -> None:
        self.work += chars
        if self.work > self.limits.max_work_chars:
            raise TemplateLimitError(
                "chat template rendering exceeded its work limit: its steps built more than "
                f"{self.limits.max_work_chars} characters in all"
            )


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Adds a deadline check at the start of every block body (so every loop iteration and macro
    call checks it, even one that calls nothing), and compiles ``a ~ b`` to a size-checked join
    (jinja's own ``str_join`` cannot be intercepted)."""

    def blockvisit(self, nodes: Iterable[jinja2.nodes.Node], frame: jinja2.compiler.Frame) -> None:
        self.writeline("environment.tick()")
        super().blockvisit(nodes, frame)

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            super().visit_Concat(node, frame)
            return
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox with the single-step bounds of :class:`RenderLimits`.

    One environment serves concurrent renders in different threads: the per-render budget lives
    in thread-local storage, set by :meth:`render` for its duration.
    """

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(("+", "*", "%", "**"))

    def __init__(self, limits: RenderLimits, **options: Any) -> None:
        super().__init__(finalize=self._finalize, **options)
        self.limits = limits
        self._local = threading.local()
        self.globals["range"] = self._range

    def render(self, template: jinja2.Template, context: Mapping[str, Any]) -> str:
        """Render ``template`` within the limits; raises :class:`TemplateLimitError`."""
        budget = _Budget(self.limits)
        self._local.budget = budget
        try:
            parts: list[str] = []
            size = 0
            for chunk in template.generate(**context):
                size += len(chunk)
                if size > self.limits.max_output_chars:
                    raise TemplateLimitError(
                        "chat template rendering exceeded its output limit of "
                        f"{self.limits.max_output_chars} characters"
                    )
                parts.append(chunk)
            budget.check_time()
            return "".join(parts)
        finally:
            self._local.budget = None

    def bound_filters(self) -> None:
        """Wrap every filter so that its arguments are checked; call after adding filters."""
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    # -- hooks the compiled template calls ----------------------------------------------------

    def tick(self) -> None:
        """Abort the render running in this thread if it is past its deadline."""
        budget: _Budget | None = getattr(self._local, "budget", None)
        if budget is not None:
            budget.check_time()

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        self._check_binop(operator, left, right)
        return self._charged(super().call_binop(context, operator, left, right))

    # Underscored parameter names, as in jinja's own `call`, so that a keyword argument named
    # `self` or `context` passes through to the called object.
    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self.tick()
        if getattr(__obj, "__func__", None) is not BoundedSandbox._range:  # range() has its own limit
            __self._check_integers(args, kwargs)
        target = getattr(__obj, "__wrapped__", __obj)  # str.format arrives wrapped by the sandbox
        subject = getattr(target, "__self__", None)
        if isinstance(subject, str) and target.__name__ in _STR_METHOD_SIZES:
            if target.__name__ == "join" and args and not _is_sized(args[0]):
                args = (list(args[0]), *args[1:])  # sized, so the result can be estimated
            if target.__name__ in ("format", "format_map"):
                __self._check_format(subject)
            __self._check_size(
                _STR_METHOD_SIZES[target.__name__](subject, args, kwargs, __self._limit), "str method"
            )
        return __self._charged(super().call(__context, __obj, *args, **kwargs))

    def bounded_join(self, parts: Iterable[Any]) -> str:
        self.tick()
        parts = tuple(parts)
        self._check_size(sum(_text_size(part, self._limit) for part in parts), "~")
        return self._charged("".join(map(str, parts)))

    # -- checks -------------------------------------------------------------------------------

    @property
    def _limit(self) -> int:
        return self.limits.max_output_chars

    def _finalize(self, value: Any) -> Any:
        # What `{{ value }}` prints: a list holding the same long string many times is small in
        # memory, yet its text is not.
        if not isinstance(value, str):
            self._check_size(_text_size(value, self._limit), "{{ }}")
        return value

    def _range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > self.limits.max_range:
            raise TemplateLimitError(
                f"chat template asked for range() of {len(rng)} items; the limit is {self.limits.max_range}"
            )
        return rng

    def _bounded_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        size_of = _FILTER_SIZES.get(name)
        signature = inspect.signature(func) if size_of is not None else None
        # pass_context / pass_eval_context / pass_environment filters get that object first.
        skip = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1

        @functools.wraps(func)  # keeps jinja's pass_* markers
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self.tick()
            self._check_integers(args[skip:], kwargs)
            if name in _PER_ITEM_FILTERS:
                self._check_per_item(name, args[skip - 1 :], kwargs)
            if size_of is not None and signature is not None and not _is_scalar(args[skip - 1 : skip]):
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                if name == "join" and not _is_sized(bound.arguments["value"]):
                    bound.arguments["value"] = list(bound.arguments["value"])
                if name == "format":
                    self._check_format(str(bound.arguments["value"]))
                self._check_size(size_of(bound.arguments, self._limit), f"|{name}")
                args, kwargs = bound.args, bound.kwargs
            return self._charged(func(*args, **kwargs))

        return bounded

    def _check_per_item(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        # These walk their input (args[0]) with a Python call per item (a key function, a test),
        # which no deadline check can interrupt; a string is walked character by character.
        count = len(args[0]) if args and isinstance(args[0], str | list | tuple | Mapping) else 0
        if count > self.limits.max_items:
            raise TemplateLimitError(
                f"chat template filter '{name}' was given {count} items; the limit is {self.limits.max_items}"
            )
        start = kwargs.get("start", args[2] if len(args) > 2 else 0)  # sum(value, attribute, start)
        if name == "sum" and not isinstance(start, int | float):
            # sum() of lists or strings copies the running total at every item: quadratic.
            raise TemplateLimitError("chat template filter 'sum' only adds numbers (start must be a number)")

    def _check_binop(self, operator: str, left: Any, right: Any) -> None:
        if operator == "+" and _is_sized(left) and _is_sized(right):
            self._check_length(left, len(left) + len(right), "+")
        elif operator == "*":
            if _is_int(left) and _is_int(right):
                self._check_int_bits(left.bit_length() + right.bit_length(), "*")
            elif _is_sized(left) and _is_int(right):
                self._check_length(left, len(left) * right, "*")
            elif _is_int(left) and _is_sized(right):
                self._check_length(right, left * len(right), "*")
        elif operator == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            self._check_int_bits(left.bit_length() * right, "**")
        elif operator == "%" and isinstance(left, str):
            values = right if isinstance(right, tuple) else (right,)
            self._check_format(left)
            self._check_integers(values, {})
            self._check_size(len(left) + _text_size(values, self._limit), "%")

    def _check_length(self, sample: Any, length: int, step: str) -> None:
        # Strings are bounded by the output limit; lists and tuples by the item limit, since each
        # item can be a long string that a later step prints.
        if isinstance(sample, str):
            self._check_size(length, step)
        elif length > self.limits.max_items:
            raise TemplateLimitError(
                f"chat template step '{step}' would build a sequence of {length} items; the limit is "
                f"{self.limits.max_items}"
            )

    def _check_size(self, size: int, step: str) -> None:
        if size > self.limits.max_output_chars:
            raise TemplateLimitError(
                f"chat template step '{step}' would build about {size} items or characters; the limit "
                f"is {self.limits.max_output_chars}"
            )

    def _check_int_bits(self, bits: int, operator: str) -> None:
        if bits > _MAX_INT_BITS:
            raise TemplateLimitError(
                f"chat template step '{operator}' would build an integer of about {bits} bits; "
                f"the limit is {_MAX_INT_BITS}"
            )

    def _check_integers(self, args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
        # Keyword names starting with "_" are jinja's own (`_loop_vars`, `_block_vars`). Called
        # for every function and filter call, so it allocates nothing in the common case.
        bound = self.limits.max_int_argument
        for values in (args, (v for k, v in kwargs.items() if not k.startswith("_"))):
            for value in values:
                if isinstance(value, Mapping):
                    self._check_integers((), {str(k): v for k, v in value.items()})
                elif _is_int(value) and not -bound <= value <= bound:
                    raise TemplateLimitError(
                        f"chat template passed the integer {value} to a function; arguments are "
                        f"limited to {bound}"
                    )

    def _check_format(self, fmt: str) -> None:
        # A width or precision is an allocation of that many characters, made in one C call.
        widths = [w for m in _PERCENT_SPEC.finditer(fmt) for w in m.groups() if w]
        widths += [w for m in _BRACE_SPEC.finditer(fmt) for w in _DIGITS.findall(m.group(1))]
        for width in widths:
            if len(width) > 9 or int(width) > self.limits.max_int_argument:
                raise TemplateLimitError(
                    f"chat template format string asks for a width of {width[:12]}; the limit is "
                    f"{self.limits.max_int_argument}"
                )

    def _charged(self, result: Any) -> Any:
        # Short results are not worth the thread-local lookup: it is the size of what a render
        # builds that is bounded, and many short strings can only add up inside containers,
        # whose steps are checked.
        if _is_sized(result) and len(result) >= _CHARGE_FROM:
            budget: _Budget | None = getattr(self._local, "budget", None)
            if budget is not None:
                budget.charge(len(result))
        return result


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sized(value: Any) -> bool:
    return isinstance(value, str | list | tuple)


def _is_scalar(values: Iterable[Any]) -> bool:
    """Whether a filter's subject (given as a 1-tuple) is a short string or a number: then no
    filter's result can be much larger than its other arguments, and estimating is skipped (it
    is the common case, e.g. `|string` per item inside a `map`)."""
    return all(
        value is None or isinstance(value, int | float) or (isinstance(value, str) and len(value) <= 256)
        for value in values
    )


def _text_size(value: Any, limit: int) -> int:
    """About how many characters ``str(value)`` (or its JSON) has, found without building it;
    stops counting once past ``limit``. Containers are walked, so shared references count as
    often as they are printed."""
    total = 0
    pending = [value]
    while pending and total <= limit:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, Mapping):
            total += 2 * len(item) + 2
            if 2 * len(item) <= limit:
                pending.extend(item.keys())
                pending.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 * len(item) + 2
            if 2 * len(item) <= limit:
                pending.extend(item)
        elif _is_int(item):
            total += item.bit_length() // 3 + 2
        else:
            total += 32
    return total


def _join_size(items: Any, separator: Any, limit: int) -> int:
    count = len(items) if _is_sized(items) or isinstance(items, Mapping) else 0
    return _text_size(items, limit) + len(str(separator)) * count


def _replace_size(text: Any, old: Any, new: Any) -> int:
    text, old, new = str(text), str(old), str(new)
    if len(new) <= len(old):
        return len(text)
    # An empty `old` matches between every two characters.
    return len(text) + (len(text) // max(len(old), 1) + 1) * len(new)


def _indent_size(text: Any, width: Any) -> int:
    text = str(text)
    return len(text) + (text.count("\n") + 1) * (width if _is_int(width) else len(str(width)))


def _wordwrap_size(text: Any, width: Any, wrapstring: Any) -> int:
    text = str(text)
    lines = len(text) // max(width if _is_int(width) else 1, 1) + 1
    return len(text) + lines * len(str(wrapstring or "\n"))


def _json_size(value: Any, indent: Any, limit: int) -> int:
    width = indent if _is_int(indent) else len(indent) if isinstance(indent, str) else 0
    return _text_size(value, limit) * (1 + max(width, 0))


def _format_size(fmt: Any, args: Any, limit: int) -> int:
    return len(str(fmt)) + _text_size(args, limit)


# Filters that call Python code per item of their input (see BoundedSandbox._check_per_item).
_PER_ITEM_FILTERS = frozenset(
    ("sort", "unique", "min", "max", "groupby", "dictsort", "sum", "batch", "slice", "list", "items")
)
# Estimated result sizes of the steps that can build much more text than they are given, by
# filter name (from the filter's bound arguments) and by str method name (subject, args, kwargs).
_FILTER_SIZES: Mapping[str, Callable[[Mapping[str, Any], int], int]] = MappingProxyType(
    {
        "join": lambda a, limit: _join_size(a["value"], a["d"], limit),
        "replace": lambda a, limit: _replace_size(a["s"], a["old"], a["new"]),
        "indent": lambda a, limit: _indent_size(a["s"], a["width"]),
        "wordwrap": lambda a, limit: _wordwrap_size(a["s"], a["width"], a["wrapstring"]),
        "format": lambda a, limit: _format_size(a["value"], (a["args"], a["kwargs"]), limit),
        "tojson": lambda a, limit: _json_size(a["value"], a["indent"], limit),
        "string": lambda a, limit: _text_size(a["s"], limit),
        "pprint": lambda a, limit: _text_size(a["value"], limit),
    }
)
_STR_METHOD_SIZES: Mapping[str, Callable[[str, tuple[Any, ...], Mapping[str, Any], int], int]] = (
    MappingProxyType(
        {
            "join": lambda s, args, kwargs, limit: _join_size(args[0] if args else (), s, limit),
            "replace": lambda s, args, kwargs, limit: _replace_size(s, *(list(args) + ["", ""])[:2]),
            "expandtabs": lambda s, args, kwargs, limit: (
                len(s) + s.count("\t") * _int_or(args[0] if args else kwargs.get("tabsize", 8))
            ),
            "format": lambda s, args, kwargs, limit: _format_size(s, (args, kwargs), limit),
            "format_map": lambda s, args, kwargs, limit: _format_size(s, args, limit),
        }
    )
)


def _int_or(value: Any, default: int = 0) -> int:
    return value if _is_int(value) else default
