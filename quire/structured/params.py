"""What a request asks its output to match: ``StructuredOutputsParams``.

Shaped like vLLM's ``StructuredOutputsParams`` so offline code moves over unchanged: exactly one of
``json`` (a JSON schema, as a dict or its JSON text), ``json_object`` (any JSON object), ``regex``,
``choice`` (one of these strings, verbatim) or ``grammar`` (Lark, or GBNF/EBNF as llama.cpp and
vLLM write it) is set. Validated at construction for shape only; whether the schema, regex or
grammar compiles is the grammar backend's call (``quire.structured.backend``), made before the
request reaches the engine.

Plain data, no dependencies: it travels inside ``SamplingParams`` to the engine process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]
_KINDS: tuple[StructuredKind, ...] = ("json", "json_object", "regex", "choice", "grammar")

# A schema or grammar is compiled and cached per distinct text; these bound what one request can
# make the engine hold (a real schema or grammar is a few KB).
MAX_SPEC_CHARS = 256 * 1024
MAX_CHOICES = 1024


@dataclass
class StructuredOutputsParams:
    """One output constraint; exactly one field set (``json_object`` counts when True).

    ``json`` accepts a dict (serialized here, key order kept: it is the order properties are
    generated in) or JSON text; either way it must be a JSON object (a schema). ``choice`` entries
    are non-empty strings, matched verbatim. ``disable_any_whitespace`` keeps JSON output compact
    (no optional whitespace between tokens), as vLLM's flag of that name.
    """

    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            try:
                self.json = json.dumps(self.json, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                raise ValueError(
                    f"structured output json schema is not serializable as JSON: {exc}"
                ) from None
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        self._validate()

    def _validate(self) -> None:
        given = [kind for kind in _KINDS if self._is_set(kind)]
        if len(given) != 1:
            named = ", ".join(given) if given else "none"
            raise ValueError(f"structured outputs need exactly one of {', '.join(_KINDS)}; got {named}")
        if not isinstance(self.json_object, bool) or not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured outputs json_object and disable_any_whitespace must be booleans")
        if self.json is not None:
            if not isinstance(self.json, str):
                raise ValueError(
                    f"structured outputs json must be a JSON schema object, got {type(self.json).__name__}"
                )
            try:
                schema = json.loads(self.json, parse_constant=_refuse_constant)
            except ValueError as exc:
                raise ValueError(f"structured outputs json is not valid JSON: {exc}") from None
            except RecursionError:
                raise ValueError("structured outputs json is nested too deeply") from None
            if not isinstance(schema, dict):
                raise ValueError("structured outputs json must be a JSON schema object ({...})")
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured outputs {kind} must be a non-empty string")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice:
                raise ValueError("structured outputs choice must be a non-empty list of strings")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(
                    f"structured outputs choice has {len(self.choice)} entries; at most {MAX_CHOICES}"
                )
            if not all(isinstance(item, str) and item for item in self.choice):
                raise ValueError("structured outputs choice entries must be non-empty strings")
        if len(self.spec_text) > MAX_SPEC_CHARS:
            raise ValueError(
                f"the structured output {self.kind} is {len(self.spec_text)} characters; at most {MAX_SPEC_CHARS}"
            )

    def _is_set(self, kind: StructuredKind) -> bool:
        value = getattr(self, kind)
        return value is True if kind == "json_object" else value is not None

    @property
    def kind(self) -> StructuredKind:
        """Which constraint this is."""
        return next(kind for kind in _KINDS if self._is_set(kind))

    @property
    def spec_text(self) -> str:
        """The constraint as text (schema JSON, regex, grammar, choices as a JSON list)."""
        kind = self.kind
        if kind == "json_object":
            return ""
        if kind == "choice":
            return json.dumps(self.choice)
        value = getattr(self, kind)
        assert isinstance(value, str)
        return value

    @property
    def cache_key(self) -> tuple[str, str]:
        """Equal for constraints that compile to the same grammar (JSON is always generated
        compact, so ``disable_any_whitespace`` changes nothing and is not part of it)."""
        return (self.kind, self.spec_text)


def _refuse_constant(name: str) -> float:
    # json.loads turns NaN / Infinity literals into floats; no schema means them.
    raise ValueError(f"{name} is not valid JSON")
