"""A ``tokenizers.Tokenizer`` rebuilt from the ``tokenizer.*`` metadata of a GGUF file.

GGUF stores a vocabulary as plain arrays (token strings, token types, scores, BPE merges) plus a
few flags; the code that turns them into a tokenizer lives in whichever engine loads the file.
This module rebuilds the equivalent Hugging Face pipeline, so a GGUF checkpoint tokenizes exactly
as the ``tokenizer.json`` it was converted from:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. ``tokenizer.ggml.pre`` names the
  pre-tokenizer (the regex family that splits text into words before BPE); each supported name is
  a recipe in ``_PRE_TOKENIZERS``.
- ``tokenizer.ggml.model == "llama"``: SentencePiece BPE with byte fallback. SentencePiece keeps
  no merge list, only a score per piece, and merges the adjacent pair whose concatenation scores
  highest; ``_merges_from_scores`` turns that rule into an equivalent ranked merge list.

Tokens of type CONTROL and USER_DEFINED become added tokens (matched in raw text before BPE);
CONTROL and UNKNOWN ones are special, so ``decode(skip_special_tokens=True)`` drops them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from quire.gguf_file import read_gguf_metadata

logger = logging.getLogger(__name__)
_MODEL_KEY = "tokenizer.ggml.model"
_PRE_KEY = "tokenizer.ggml.pre"
_CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
# Named special tokens: GGUF id key -> the transformers name the chat templates see.
_NAMED_TOKEN_KEYS = MappingProxyType(
    {
        "tokenizer.ggml.bos_token_id": "bos_token",
        "tokenizer.ggml.eos_token_id": "eos_token",
        "tokenizer.ggml.unknown_token_id": "unk_token",
        "tokenizer.ggml.padding_token_id": "pad_token",
        "tokenizer.ggml.seperator_token_id": "sep_token",  # sic: GGUF's own spelling
        "tokenizer.ggml.mask_token_id": "mask_token",
    }
)
# Tokens besides EOS that end a turn in chat models (Llama 3's <|eot_id|>, <|eom_id|>).
_END_OF_GENERATION_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# GGUF records a single EOS id, but chat models end turns with other control tokens too (their
# generation_config.json lists them, and it is not converted); like llama.cpp, treat control
# tokens with these well-known texts as ending generation as well.
_END_OF_TURN_TEXTS = frozenset(
    {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>"}
)
_SPACE = "▁"  # SentencePiece's visible space (U+2581)


class TokenType(IntEnum):
    """GGUF's ``tokenizer.ggml.token_type`` values (SentencePiece's piece types)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class GGUFVocab:
    """The ``tokenizer.*`` metadata of one GGUF file, decoded but not yet interpreted."""

    source: str
    model: str
    pre: str | None
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...]
    merges: tuple[tuple[str, str], ...]
    named_token_ids: Mapping[str, int]  # "bos_token" -> id, ...
    end_of_generation_ids: tuple[int, ...]
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool | None
    chat_templates: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0:
            raise ValueError(f"{self.source}: tokenizer.ggml.tokens is missing or empty")
        if self.token_types and len(self.token_types) != n:
            raise ValueError(
                f"{self.source}: tokenizer.ggml.token_type has {len(self.token_types)} entries for {n} tokens"
            )
        if self.scores and len(self.scores) != n:
            raise ValueError(
                f"{self.source}: tokenizer.ggml.scores has {len(self.scores)} entries for {n} tokens"
            )
        for name, token_id in self.named_token_ids.items():
            if not 0 <= token_id < n:
                raise ValueError(
                    f"{self.source}: {name} id {token_id} is outside the vocabulary of {n} tokens"
                )
        if any(not 0 <= i < n for i in self.end_of_generation_ids):
            raise ValueError(
                f"{self.source}: end-of-generation ids {self.end_of_generation_ids} exceed the vocabulary of {n}"
            )

    def token_type(self, token_id: int) -> int:
        # Files without token types (rare, hand-made) treat every token as normal text.
        return self.token_types[token_id] if self.token_types else TokenType.NORMAL


@dataclass(frozen=True)
class GGUFTokenizerParts:
    """What ``quire.tokenizer.Tokenizer`` is constructed from."""

    backend: tokenizers.Tokenizer
    special_tokens: dict[str, str]
    add_bos_token: bool
    add_eos_token: bool
    extra_eos_token_ids: tuple[int, ...]
    chat_templates: dict[str, str]
    source: str


# -- reading the file -----------------------------------------------------------------------------


def read_gguf_vocab(path: str | Path) -> GGUFVocab:
    """Read the ``tokenizer.*`` fields of a GGUF file (tensor data is not touched)."""
    source = str(path)
    fields = read_gguf_metadata(path, lambda key: key.startswith("tokenizer."))

    def value(key: str) -> Any:
        return fields.get(key)

    model = value(_MODEL_KEY)
    if not isinstance(model, str):
        raise ValueError(f"{source}: {_MODEL_KEY} is missing; the file carries no tokenizer")
    n_tokens = len(fields.get("tokenizer.ggml.tokens") or ())
    named, end_of_generation = {}, []
    for key in (*_NAMED_TOKEN_KEYS, *_END_OF_GENERATION_KEYS):
        if key not in fields:
            continue
        token_id = int(fields[key])
        if not 0 <= token_id < n_tokens:
            # Converters sometimes record a pad/sep id past the vocabulary; llama.cpp warns and
            # ignores such ids, and so does quire rather than refuse the whole model.
            logger.warning(
                "%s: ignoring %s = %d, outside the %d-token vocabulary", source, key, token_id, n_tokens
            )
        elif key in _NAMED_TOKEN_KEYS:
            named[_NAMED_TOKEN_KEYS[key]] = token_id
        else:
            end_of_generation.append(token_id)
    return GGUFVocab(
        source=source,
        model=model,
        pre=value(_PRE_KEY),
        tokens=tuple(value("tokenizer.ggml.tokens") or ()),
        token_types=tuple(int(t) for t in value("tokenizer.ggml.token_type") or ()),
        scores=tuple(float(s) for s in value("tokenizer.ggml.scores") or ()),
        merges=tuple(_parse_merge(m, source) for m in value("tokenizer.ggml.merges") or ()),
        named_token_ids=named,
        end_of_generation_ids=tuple(end_of_generation),
        add_bos=_optional_bool(value("tokenizer.ggml.add_bos_token")),
        add_eos=_optional_bool(value("tokenizer.ggml.add_eos_token")),
        add_space_prefix=_optional_bool(value("tokenizer.ggml.add_space_prefix")),
        chat_templates=_chat_templates(fields),
    )


def _optional_bool(raw: Any) -> bool | None:
    return None if raw is None else bool(raw)


def _parse_merge(merge: str, source: str) -> tuple[str, str]:
    # Merges are "left right"; byte-level and SentencePiece pieces never contain a plain space.
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise ValueError(f"{source}: tokenizer.ggml.merges entry {merge!r} is not 'left right'")
    return left, right


def _chat_templates(fields: Mapping[str, Any]) -> dict[str, str]:
    # The default template is tokenizer.chat_template; named ones are tokenizer.chat_template.<name>.
    templates = {}
    default = fields.get(_CHAT_TEMPLATE_KEY)
    if isinstance(default, str):
        templates["default"] = default
    for key in sorted(fields):
        template = fields[key]
        if key.startswith(_CHAT_TEMPLATE_KEY + ".") and isinstance(template, str):
            templates[key.removeprefix(_CHAT_TEMPLATE_KEY + ".")] = template
    return templates


# -- pre-tokenizers of byte-level BPE --------------------------------------------------------------

# The GPT-2 word regex; tokenizers' ByteLevel(use_regex=True) applies exactly this one.
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_WORDS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_WORDS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizerRecipe:
    """How one ``tokenizer.ggml.pre`` family splits text, in tokenizers' terms."""

    # Regexes applied in order, each isolating its matches within the pieces the previous left.
    splits: tuple[str, ...] = ()
    split_digits: bool = False  # every digit its own word (StarCoder / SmolLM)
    gpt2_regex: bool = True  # finish with the GPT-2 word regex (else only the byte mapping)
    nfc: bool = False
    ignore_merges: bool = False  # a word that is itself a token is taken whole (Llama 3)
    add_bos: bool = False  # the default when the file has no tokenizer.ggml.add_bos_token

    def apply(self, backend: tokenizers.Tokenizer) -> None:
        steps: list[Any] = []
        if self.split_digits:
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        steps += [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in self.splits]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=self.gpt2_regex))
        backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
        if self.nfc:
            backend.normalizer = normalizers.NFC()


_PRE_TOKENIZERS: Mapping[str, _PreTokenizerRecipe] = MappingProxyType(
    {
        "gpt2": _PreTokenizerRecipe(),
        "gpt-2": _PreTokenizerRecipe(),
        "smollm": _PreTokenizerRecipe(split_digits=True),
        "starcoder": _PreTokenizerRecipe(split_digits=True),
        "llama-bpe": _PreTokenizerRecipe(
            splits=(_LLAMA3_WORDS,), gpt2_regex=False, ignore_merges=True, add_bos=True
        ),
        "llama3": _PreTokenizerRecipe(
            splits=(_LLAMA3_WORDS,), gpt2_regex=False, ignore_merges=True, add_bos=True
        ),
        # Qwen2's tokenizer.json NFC-normalizes before splitting; llama.cpp skips that step.
        "qwen2": _PreTokenizerRecipe(splits=(_QWEN2_WORDS,), gpt2_regex=False, nfc=True),
        # llama.cpp's fallback for files that name no family: punctuation runs, GPT-2 words, digit
        # runs, then groups of three digits, each split applied within the previous pieces.
        "default": _PreTokenizerRecipe(
            splits=(r"[\p{P}\$\+<=>\^~\|]+", _GPT2_WORDS, r"\p{N}+", r"[0-9][0-9][0-9]"), gpt2_regex=False
        ),
    }
)


# -- the two tokenizer models ----------------------------------------------------------------------


@dataclass(frozen=True)
class _ModelRecipe:
    build: Callable[[GGUFVocab], tokenizers.Tokenizer]
    default_add_bos: Callable[[GGUFVocab], bool]


def _vocab_dict(vocab: GGUFVocab) -> dict[str, int]:
    # A token string listed twice keeps its first id (tokenizers' vocabulary is a plain map).
    ids: dict[str, int] = {}
    for i, token in enumerate(vocab.tokens):
        ids.setdefault(token, i)
    return ids


def _build_byte_level_bpe(vocab: GGUFVocab) -> tokenizers.Tokenizer:
    recipe = _pre_tokenizer_recipe(vocab)
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=_vocab_dict(vocab), merges=list(vocab.merges), ignore_merges=recipe.ignore_merges)
    )
    recipe.apply(backend)
    backend.decoder = decoders.ByteLevel()
    return backend


def _pre_tokenizer_recipe(vocab: GGUFVocab) -> _PreTokenizerRecipe:
    name = vocab.pre or "default"  # llama.cpp's choice for files converted before the field existed
    recipe = _PRE_TOKENIZERS.get(name)
    if recipe is None:
        raise ValueError(
            f"{vocab.source}: {_PRE_KEY} {name!r} is not a supported pre-tokenizer; "
            f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    return recipe


def _build_sentencepiece_bpe(vocab: GGUFVocab) -> tokenizers.Tokenizer:
    merges = list(vocab.merges) if vocab.merges else _merges_from_scores(vocab)
    unk_id = vocab.named_token_ids.get("unk_token")
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=_vocab_dict(vocab),
            merges=merges,
            unk_token=None if unk_id is None else vocab.tokens[unk_id],
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    # SentencePiece sees the whole text as one word: spaces become ▁ and, unless the file says
    # otherwise, a ▁ is prepended (after every special token too, as llama.cpp and HF's legacy
    # Llama tokenizer both do: the normalizer runs once per span between added tokens).
    add_prefix = True if vocab.add_space_prefix is None else vocab.add_space_prefix
    steps = [normalizers.Prepend(_SPACE)] if add_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE)])
    decode_steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))  # the prepended space is not part of the text
    backend.decoder = decoders.Sequence(decode_steps)
    return backend


def _merges_from_scores(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """Rank every split of every normal piece into two normal pieces by the whole piece's score.

    SentencePiece BPE merges, at each step, the adjacent pair whose concatenation is the
    highest-scoring piece; a BPE merge list sorted by that score makes the same choices. Ties
    fall back to the lower id, then the shorter left part.
    """
    if not vocab.scores:
        raise ValueError(f"{vocab.source}: tokenizer.ggml.scores is required for a 'llama' tokenizer")
    normal = {token: i for i, token in enumerate(vocab.tokens) if vocab.token_type(i) == TokenType.NORMAL}
    ranked = []
    for token, i in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-vocab.scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _default_add_bos_bpe(vocab: GGUFVocab) -> bool:
    return _pre_tokenizer_recipe(vocab).add_bos


_MODELS: Mapping[str, _ModelRecipe] = MappingProxyType(
    {
        "gpt2": _ModelRecipe(_build_byte_level_bpe, _default_add_bos_bpe),
        # SentencePiece models (Llama 2, Mistral, TinyLlama) start every prompt with BOS.
        "llama": _ModelRecipe(_build_sentencepiece_bpe, lambda _vocab: True),
    }
)


# -- putting it together ---------------------------------------------------------------------------


def build_backend(vocab: GGUFVocab) -> tokenizers.Tokenizer:
    """The ``tokenizers.Tokenizer`` for ``vocab``, its added (special) tokens included."""
    backend = _model_recipe(vocab).build(vocab)
    # Every id keeps its place: these tokens are in the model vocabulary already, so add_tokens
    # only marks them as matched-before-BPE (and special ones as skipped when decoding).
    special = (TokenType.CONTROL, TokenType.UNKNOWN)
    added = [
        AddedToken(token, special=vocab.token_type(i) in special, normalized=False)
        for i, token in enumerate(vocab.tokens)
        if vocab.token_type(i) in (*special, TokenType.USER_DEFINED)
    ]
    if added:
        backend.add_tokens(added)
    return backend


def _model_recipe(vocab: GGUFVocab) -> _ModelRecipe:
    recipe = _MODELS.get(vocab.model)
    if recipe is None:
        raise ValueError(
            f"{vocab.source}: {_MODEL_KEY} {vocab.model!r} is not a supported tokenizer model; "
            f"supported: {', '.join(sorted(_MODELS))}"
        )
    return recipe


def gguf_tokenizer_parts(vocab: GGUFVocab) -> GGUFTokenizerParts:
    """Everything ``Tokenizer`` needs, from already-read GGUF vocabulary metadata."""
    backend = build_backend(vocab)
    add_bos = _model_recipe(vocab).default_add_bos(vocab) if vocab.add_bos is None else vocab.add_bos
    return GGUFTokenizerParts(
        backend=backend,
        special_tokens={name: vocab.tokens[i] for name, i in vocab.named_token_ids.items()},
        add_bos_token=add_bos,
        add_eos_token=bool(vocab.add_eos),
        extra_eos_token_ids=(*vocab.end_of_generation_ids, *_end_of_turn_ids(vocab)),
        chat_templates=dict(vocab.chat_templates),
        source=vocab.source,
    )


def _end_of_turn_ids(vocab: GGUFVocab) -> list[int]:
    return [
        i
        for i, token in enumerate(vocab.tokens)
        if token in _END_OF_TURN_TEXTS and vocab.token_type(i) == TokenType.CONTROL
    ]


def load_gguf_tokenizer(path: str | Path) -> GGUFTokenizerParts:
    """Read a GGUF file's tokenizer metadata and rebuild its tokenizer."""
    return gguf_tokenizer_parts(read_gguf_vocab(path))
