"""Write a Hugging Face tokenizer directory's vocabulary into GGUF ``tokenizer.*`` metadata.

This follows what llama.cpp's HF->GGUF converter stores, for the two BPE flavours quire reads:

- byte-level BPE (``tokenizer.ggml.model = "gpt2"``): tokens, token types, merges, and the
  pre-tokenizer family in ``tokenizer.ggml.pre``. The converter identifies the family by hashing
  the ids of a probe text; here the ``pre_tokenizer`` section of tokenizer.json is matched
  against the few structures the tests build (``_PRE_TOKENIZER_NAMES``).
- SentencePiece-style BPE with byte fallback (``"llama"``): tokens, types (BYTE for ``<0xXX>``,
  UNKNOWN for the unk piece) and scores. A SentencePiece ``tokenizer.model`` stores each piece's
  score as minus its merge rank; without that file the score is derived from tokenizer.json's
  merge order, which is the same number.

Special-token ids, ``add_bos_token``/``add_eos_token`` and the chat templates come from
tokenizer_config.json (and chat_template.jinja), as the converter's ``SpecialVocab`` takes them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Structure of tokenizer.json's pre_tokenizer (see _signature) -> tokenizer.ggml.pre.
_PRE_TOKENIZER_NAMES: dict[tuple[tuple[str, Any], ...], str] = {
    (("ByteLevel", True),): "gpt2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_REGEX), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_REGEX), ("ByteLevel", False)): "qwen2",
}
_NAMED_TOKENS = {
    "bos_token": gguf.GGUFWriter.add_bos_token_id,
    "eos_token": gguf.GGUFWriter.add_eos_token_id,
    "unk_token": gguf.GGUFWriter.add_unk_token_id,
    "pad_token": gguf.GGUFWriter.add_pad_token_id,
}


def add_tokenizer_metadata(writer: gguf.GGUFWriter, hf_dir: Path) -> None:
    """Add the ``tokenizer.*`` keys for the tokenizer in ``hf_dir`` to ``writer``."""
    data = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config = _json_or_empty(hf_dir / "tokenizer_config.json")
    model = data["model"]
    if model["type"] != "BPE":
        raise ValueError(f"{hf_dir}: only BPE tokenizers are written to GGUF here, got {model['type']}")
    tokens, specials, user_defined = _tokens_by_id(data)
    by_text = {token: i for i, token in enumerate(tokens)}
    if model.get("byte_fallback"):
        _add_sentencepiece_vocab(writer, data, tokens, specials, user_defined)
    else:
        _add_byte_level_vocab(writer, data, tokens, specials, user_defined)

    for name, add_id in _NAMED_TOKENS.items():
        content = _token_content(config.get(name))
        if content is not None and content in by_text:
            add_id(writer, by_text[content])
    add_bos, add_eos = _bos_eos_flags(data, config, tokens)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_eos is not None:
        writer.add_add_eos_token(add_eos)
    template = _chat_template(hf_dir, config)
    if template is not None:
        writer.add_chat_template(template)


def _json_or_empty(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _tokens_by_id(data: dict[str, Any]) -> tuple[list[str], set[int], set[int]]:
    by_id = {i: token for token, i in data["model"]["vocab"].items()}
    specials, user_defined = set(), set()
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        (specials if added.get("special") else user_defined).add(added["id"])
    # Ids the vocabulary skips are written as unused placeholders, as the converter does.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
    return tokens, specials, user_defined


def _token_types(tokens: list[str], specials: set[int], user_defined: set[int]) -> list[int]:
    types = []
    for i in range(len(tokens)):
        if i in specials:
            types.append(gguf.TokenType.CONTROL)
        elif i in user_defined:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return types


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    # tokenizers writes merges as ["a", "b"] pairs (0.20+) or "a b" strings (older files).
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model.get("merges", [])]


def _add_byte_level_vocab(
    writer: gguf.GGUFWriter, data: dict[str, Any], tokens: list[str], specials: set[int], user: set[int]
) -> None:
    signature = _signature(data.get("pre_tokenizer"))
    pre = _PRE_TOKENIZER_NAMES.get(signature)
    if pre is None:
        raise ValueError(f"no tokenizer.ggml.pre name for the pre-tokenizer structure {signature}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(_token_types(tokens, specials, user))
    writer.add_token_merges([f"{left} {right}" for left, right in _merge_pairs(data["model"])])


def _signature(pre_tokenizer: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    if pre_tokenizer is None:
        return ()
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer["type"] == "Sequence" else [pre_tokenizer]
    signature = []
    for step in steps:
        kind = step["type"]
        if kind == "ByteLevel":
            signature.append((kind, step.get("use_regex", True)))
        elif kind == "Digits":
            signature.append((kind, step.get("individual_digits", False)))
        elif kind == "Split":
            signature.append((kind, step["pattern"].get("Regex", step["pattern"].get("String"))))
        else:
            signature.append((kind, None))
    return tuple(signature)


def _add_sentencepiece_vocab(
    writer: gguf.GGUFWriter, data: dict[str, Any], tokens: list[str], specials: set[int], user: set[int]
) -> None:
    model = data["model"]
    types = _token_types(tokens, specials, user)
    unk = model.get("unk_token")
    for i, token in enumerate(tokens):
        if _BYTE_PIECE.fullmatch(token):
            types[i] = gguf.TokenType.BYTE
        elif token == unk:
            types[i] = gguf.TokenType.UNKNOWN
    # Score = minus the merge rank of the merge that creates the piece; pieces no merge creates
    # (characters, bytes, control tokens) rank after every merge, in id order.
    rank = {left + right: r for r, (left, right) in enumerate(_merge_pairs(model))}
    scores = [-float(rank.get(token, len(rank) + i)) for i, token in enumerate(tokens)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(data))


def _adds_space_prefix(data: dict[str, Any]) -> bool:
    normalizer = data.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer])
    if any(step.get("type") == "Prepend" for step in steps):
        return True
    pre = data.get("pre_tokenizer") or {}
    return pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never"


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _bos_eos_flags(
    data: dict[str, Any], config: dict[str, Any], tokens: list[str]
) -> tuple[bool | None, bool | None]:
    # tokenizer_config.json's flags win; otherwise a TemplateProcessing post-processor that wraps
    # the text in special tokens says whether BOS/EOS are added.
    add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
    post = data.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        single = post.get("single", [])
        pieces = [p for p in single if "SpecialToken" in p]
        sequence_at = next((k for k, p in enumerate(single) if "Sequence" in p), 0)
        bos = _token_content(config.get("bos_token"))
        eos = _token_content(config.get("eos_token"))
        before = [p["SpecialToken"]["id"] for p in pieces if single.index(p) < sequence_at]
        after = [p["SpecialToken"]["id"] for p in pieces if single.index(p) > sequence_at]
        add_bos = add_bos if add_bos is not None else bos in before
        add_eos = add_eos if add_eos is not None else eos in after
    return add_bos, add_eos


def _chat_template(hf_dir: Path, config: dict[str, Any]) -> str | list[dict[str, str]] | None:
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return config.get("chat_template")


def write_tokenizer_gguf(hf_dir: Path, out: Path, arch: str = "llama") -> Path:
    """A GGUF file holding only ``hf_dir``'s tokenizer metadata (no tensors)."""
    writer = gguf.GGUFWriter(str(out), arch)
    add_tokenizer_metadata(writer, hf_dir)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
