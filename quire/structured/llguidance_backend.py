"""The llguidance grammar backend (chosen by measurement; see docs/architecture.md).

llguidance compiles a JSON schema in about a millisecond (per-request schemas, as in tool
calling, make compile time matter), takes Lark, GBNF and regex directly, has no run-time
dependencies, and computes a batch's masks in Rust with the GIL released.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance

from quire.structured.large_stack import run_with_large_stack
from quire.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    import torch

    from quire.tokenizer import Tokenizer

# Compact JSON: no optional whitespace between tokens. llguidance's own default allows any run
# of whitespace anywhere, so a model (or random weights) can spend all of max_tokens on spaces
# and newlines without ever closing the object; compact output cannot stall that way, so it is
# the better default for validity. disable_any_whitespace asks for exactly this and is honoured
# by it.
_JSON_OPTIONS: dict[str, object] = {"whitespace_flexible": False}
# A schema may carry llguidance's own "x-guidance" options; these always win over it, so a request
# cannot turn whitespace back on, change the separators (" = " would not be JSON), skip keywords
# it does not implement ("lenient": the output would then not validate against the schema) or
# loosen oneOf into anyOf.
_FORCED_JSON_OPTIONS: dict[str, object] = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
    "lenient": False,
    "coerce_one_of": False,
}


def _limits() -> llguidance.LLParserLimits:
    """Bounds on what one grammar may cost, so that a hostile schema or grammar fails with an
    error instead of eating the engine's memory or stalling every step. Real schemas and
    grammars stay far below each (a few hundred lexer states, a few thousand items)."""
    return llguidance.LLParserLimits(
        max_items_in_row=2_000,  # branching of one grammar row (llguidance's default)
        # Measured on a loaded 2-core machine: 300k fuel bounds the first mask of a pathological
        # regex such as (a{1000}){1000} to ~0.2 s before it fails (llguidance's default of 1M let
        # it run ~1 s); a realistic 7-property schema uses a small fraction of it.
        initial_lexer_fuel=300_000,
        step_lexer_fuel=100_000,  # lexer work per mask step (default 200k)
        step_max_items=50_000,  # parser items per mask step (llguidance's default)
        max_lexer_states=50_000,  # 1-2 kB each: at most ~100 MB (default 250k)
        max_grammar_size=200_000,  # symbols in all productions (default 500k)
        # Verbose errors quote the parser state, i.e. generated text; errors reach logs and clients.
        verbose_errors=False,
    )


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for ``params``. ``ValueError`` if it cannot be
    written at all (a GBNF grammar that does not convert); whether it compiles is checked later."""
    kind = params.kind
    if kind == "json" or kind == "json_object":
        schema = _without_unknown_formats(params.json) if kind == "json" else '{"type": "object"}'
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults=_JSON_OPTIONS, overrides=_FORCED_JSON_OPTIONS
            )
        except ValueError as exc:
            raise ValueError(f"invalid JSON schema: {exc}") from None
    if kind == "regex":
        assert params.regex is not None
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        assert params.choice is not None
        # JSON string literals are Lark string literals: each choice is matched verbatim.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in params.choice)
        )
    assert params.grammar is not None
    return llguidance.LLMatcher.grammar_from_lark(_to_lark(params.grammar))


# The string formats llguidance enforces. JSON Schema makes "format" an annotation that validators
# need not check (jsonschema does not by default), so any other value is dropped rather than
# refused: pydantic writes "password" for SecretStr, "binary" for bytes, "path" for Path, and
# those schemas must work, with the string left unconstrained.
_ENFORCED_FORMATS = frozenset(
    {"date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"}
)
# Keywords whose values are data, not schemas: a "format" key inside them is left alone.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def _without_unknown_formats(schema_text: str | None) -> str:
    assert schema_text is not None
    try:
        schema = json.loads(schema_text)
        return json.dumps(_drop_unknown_formats(schema)) if _has_unknown_format(schema) else schema_text
    except RecursionError:
        raise ValueError("invalid JSON schema: nested too deeply") from None


def _has_unknown_format(node: object) -> bool:
    if isinstance(node, dict):
        if isinstance(node.get("format"), str) and node["format"] not in _ENFORCED_FORMATS:
            return True
        return any(_has_unknown_format(v) for k, v in node.items() if k not in _DATA_KEYWORDS)
    if isinstance(node, list):
        return any(_has_unknown_format(v) for v in node)
    return False


def _drop_unknown_formats(node: object) -> object:
    if isinstance(node, dict):
        return {
            k: (v if k in _DATA_KEYWORDS else _drop_unknown_formats(v))
            for k, v in node.items()
            if not (k == "format" and isinstance(v, str) and v not in _ENFORCED_FORMATS)
        }
    if isinstance(node, list):
        return [_drop_unknown_formats(v) for v in node]
    return node


def _to_lark(grammar: str) -> str:
    """Lark as given; GBNF/EBNF (rules written ``name ::= ...``, as llama.cpp and vLLM do) converted."""
    if "::=" not in grammar:
        return grammar
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        return gbnf_to_lark(grammar)
    except Exception as exc:  # the converter raises bare Exceptions for grammar errors
        raise ValueError(f"invalid GBNF/EBNF grammar: {exc}") from None


class _Matcher:
    """One sequence's place in its grammar (an ``llguidance.LLMatcher``)."""

    __slots__ = ("inner", "eos")

    def __init__(self, inner: llguidance.LLMatcher, eos: frozenset[int]) -> None:
        self.inner = inner
        self.eos = eos

    def allows(self, token_id: int) -> bool:
        # validate_tokens never counts end-of-sequence; whether the grammar may end here decides it.
        if token_id in self.eos:
            return self.inner.is_accepting() and not self.inner.is_error()
        return self.inner.validate_tokens([token_id]) == 1

    def accept(self, token_id: int) -> bool:
        return self.inner.consume_token(token_id)

    def accept_many(self, token_ids: Sequence[int]) -> bool:
        return self.inner.consume_tokens(list(token_ids)) if token_ids else True

    def rollback(self, num_tokens: int) -> None:
        if not self.inner.rollback(num_tokens):
            raise ValueError(f"cannot roll the grammar back by {num_tokens} tokens: {self.inner.get_error()}")

    def error(self) -> str:
        return self.inner.get_error() if self.inner.is_error() else ""


class LLGuidanceBackend:
    """``GrammarBackend`` on llguidance. The compiled grammar is a pristine ``LLMatcher``; a new
    sequence gets a deep copy of it (cheap: the lexer and parser tables are shared)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = frozenset(tokenizer.eos_tokens)
        # Rust threads that fill the batch's masks; one call per step covers every row.
        self._executor = llguidance.LLExecutor()

    @classmethod
    def validate(cls, params: StructuredOutputsParams) -> None:
        message = run_with_large_stack(
            lambda: llguidance.LLMatcher.validate_grammar(grammar_text(params), limits=_limits())
        )
        if message:
            raise ValueError(f"invalid structured output {params.kind}: {message.strip()}")

    @classmethod
    def create(cls, tokenizer: Tokenizer, vocab_size: int) -> LLGuidanceBackend:
        # The model's own tokenizer, with every end-of-sequence id it knows: the grammar allows
        # them (and only them) once it is complete. A vocabulary wider than the tokenizer's
        # (padded for the GEMM) leaves the extra ids forbidden.
        eos = sorted(tokenizer.eos_token_ids)
        ll_tokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=eos or None)
        return cls(ll_tokenizer, vocab_size)

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        # log_level 0: llguidance would otherwise print refused tokens (generated text) to stderr.
        matcher = run_with_large_stack(
            lambda: llguidance.LLMatcher(self.tokenizer, grammar_text(params), log_level=0, limits=_limits())
        )
        if matcher.is_error():
            raise ValueError(f"invalid structured output {params.kind}: {matcher.get_error().strip()}")
        return matcher

    def new_matcher(self, compiled: llguidance.LLMatcher) -> _Matcher:
        return _Matcher(compiled.deep_copy(), self._eos)

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        import torch

        return torch.full((num_rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def fill_bitmask(self, matchers: Sequence[_Matcher], bitmask: torch.Tensor) -> None:  # type: ignore[override]
        # What llguidance.torch.fill_next_token_bitmask_par does, without importing that module
        # (it sets up torch.compile at import). Rust writes straight into the tensor's memory, so
        # its shape, dtype and layout are checked here, not trusted.
        import torch

        rows, words = bitmask.shape
        if (
            bitmask.dtype != torch.int32
            or bitmask.device.type != "cpu"
            or not bitmask.is_contiguous()
            or rows < len(matchers)
            or words * 32 < self.vocab_size
        ):
            raise ValueError(
                f"the bitmask must be a contiguous CPU int32 tensor of at least [{len(matchers)}, "
                f"{(self.vocab_size + 31) // 32}]; got {bitmask.dtype} {tuple(bitmask.shape)} on {bitmask.device}"
            )
        pairs = [(m.inner, i) for i, m in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, rows)
