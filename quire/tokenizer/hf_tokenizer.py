"""``Tokenizer``: a Hugging Face tokenizer directory or a GGUF file's tokenizer behind the small API the engine needs."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from quire.tokenizer.chat_template import ChatTemplates

# Texts this long are encoded with the GIL released (same ids; a thread hop is not worth it below),
# so callers tokenize them in a worker thread (the server's admission does).
GIL_FREE_ENCODE_CHARS = 16384
_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_CHAT_TEMPLATE_DIR = "additional_chat_templates"
_STANDARD_SPECIAL_TOKENS = frozenset(
    {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}
)


class Tokenizer:
    """Encodes prompts, decodes outputs and renders chat templates for one model.

    Build it with ``Tokenizer.from_path(path)`` (a model directory or a ``.gguf`` file). ``backend`` is a ``tokenizers.Tokenizer``; its
    truncation and padding are switched off, because a ``tokenizer.json`` that carries them would
    otherwise silently cut long prompts.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool = False,
        extra_eos_token_ids: Iterable[int] = (),
        chat_templates: Mapping[str, str] | None = None,
        source: str = "<in-memory tokenizer>",
    ) -> None:
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self._source = source
        # Named special tokens (bos_token, eos_token, pad_token, model-specific *_token) as strings.
        self._special_tokens = dict(special_tokens or {})
        self._bos_id = self._named_id("bos_token")
        self._eos_id = self._named_id("eos_token")
        self._pad_id = self._named_id("pad_token")
        # HF ignores add_bos_token when bos_token is unset; a config saying both is not an error.
        self._add_bos = bool(add_bos_token) and self._bos_id is not None
        self._add_eos = add_eos_token and self._eos_id is not None
        empty_encoding = backend.encode("", add_special_tokens=True).ids
        self._post_processor_adds_bos = self._bos_id is not None and empty_encoding[:1] == [self._bos_id]

        added = backend.get_added_tokens_decoder()
        # Exactly the ids tokenizers' decode(skip_special_tokens=True) drops: the detokenizer relies
        # on this set matching so that streaming equals a one-shot decode.
        self._skipped_ids = frozenset(i for i, token in added.items() if token.special)
        named_ids = (self.token_to_id(token) for token in self._special_tokens.values())
        self._all_special_ids = self._skipped_ids | {i for i in named_ids if i is not None}

        eos = set(extra_eos_token_ids)
        if self._eos_id is not None:
            eos.add(self._eos_id)
        self._eos_ids = frozenset(eos)

        self._vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        self._chat = ChatTemplates(chat_templates or {}, self._special_tokens, source)

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Load from a model directory (see ``from_dir``) or a ``.gguf`` file (see ``from_gguf``)."""
        from quire.gguf_file import is_gguf_file  # the model loader's test too: name or magic bytes

        target = Path(path)
        if is_gguf_file(target):
            return cls.from_gguf(target)
        if target.is_dir():
            return cls.from_dir(target)
        raise ValueError(f"tokenizer path {str(target)!r} is neither a model directory nor a .gguf file")

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Rebuild the tokenizer stored in a GGUF file's ``tokenizer.*`` metadata: vocabulary, merges
        or scores, special tokens, BOS/EOS flags and chat templates."""
        # Deferred: only GGUF checkpoints pay for the import.
        from quire.tokenizer.gguf_tokenizer import load_gguf_tokenizer

        parts = load_gguf_tokenizer(path)
        return cls(
            parts.backend,
            special_tokens=parts.special_tokens,
            add_bos_token=parts.add_bos_token,
            add_eos_token=parts.add_eos_token,
            extra_eos_token_ids=parts.extra_eos_token_ids,
            chat_templates=parts.chat_templates,
            source=parts.source,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (required) plus ``tokenizer_config.json``, ``chat_template.jinja``,
        ``generation_config.json`` and ``config.json`` (all optional) from a local directory."""
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"tokenizer path {str(root)!r} is not a directory; pass a local model directory")
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(
                f"{tokenizer_file} not found: quire needs a fast tokenizer file; create one with transformers' "
                "AutoTokenizer.from_pretrained(<dir>).save_pretrained(<dir>)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for any parse failure
            raise ValueError(f"{tokenizer_file} is not a valid tokenizers file: {exc}") from exc

        config = read_json_object(root / "tokenizer_config.json")
        generation_config = read_json_object(root / "generation_config.json")
        model_config = read_json_object(root / "config.json")
        extra_eos: list[int] = []
        extra_eos += _token_ids(generation_config.get("eos_token_id"), root / "generation_config.json")
        extra_eos += _token_ids(model_config.get("eos_token_id"), root / "config.json")
        text_config = model_config.get("text_config")  # multimodal checkpoints nest the LM's config
        if isinstance(text_config, dict):
            extra_eos += _token_ids(text_config.get("eos_token_id"), root / "config.json")

        add_bos = config.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise ValueError(
                f"{root / 'tokenizer_config.json'}: add_bos_token must be true or false, got {add_bos!r}"
            )
        return cls(
            backend,
            special_tokens=_special_tokens(config, root / "tokenizer_config.json"),
            add_bos_token=add_bos,
            extra_eos_token_ids=extra_eos,
            chat_templates=_chat_templates(root, config),
            source=str(root),
        )

    # -- encoding and decoding ------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. With ``add_special_tokens`` the tokenizer's post-processor runs, and
        BOS is prepended when ``add_bos_token`` asks for it and the post-processor did not add one,
        and EOS appended when ``add_eos_token`` asks for it (some GGUF embedding models).
        Never yields two BOS: text that already starts with the BOS token (a rendered chat template
        often does) keeps just that one."""
        if len(text) < GIL_FREE_ENCODE_CHARS:
            ids: list[int] = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            # encode() holds the GIL throughout; encode_batch() releases it, so a long prompt
            # tokenized in a worker thread does not stall the server's event loop.
            ids = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self._bos_id is not None:
            bos = self._bos_id
            if self._add_bos and ids[:1] != [bos]:
                ids.insert(0, bos)
            elif self._post_processor_adds_bos and ids[:2] == [bos, bos]:
                del ids[0]
        if add_special_tokens and self._add_eos:
            ids.append(self._eos_id)  # type: ignore[arg-type]  # _add_eos implies an eos id
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Ids outside the vocabulary (padded model vocabularies) decode to nothing."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id`` (e.g. ``"Ġthe"``, ``"▁the"``), or None if unknown."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # -- properties -----------------------------------------------------------------------------

    def to_json(self) -> str:
        """The underlying ``tokenizers`` tokenizer as its JSON text (``tokenizer.json``'s format),
        for libraries that build their own view of the vocabulary (e.g. the grammar engine)."""
        return self._backend.to_str()

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (what transformers calls ``len(tokenizer)``)."""
        return self._vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the tokenizer's eos_token plus ``eos_token_id`` of
        generation_config.json and config.json (chat models often list several)."""
        return self._eos_ids

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_id

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens from tokenizer_config.json, e.g. ``{"bos_token": "<s>", ...}``."""
        return dict(self._special_tokens)

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids of all added special tokens and of the named special tokens."""
        return self._all_special_ids

    @property
    def skipped_special_ids(self) -> frozenset[int]:
        """The ids ``decode(..., skip_special_tokens=True)`` leaves out."""
        return self._skipped_ids

    @property
    def chat_template(self) -> str | None:
        """The default chat template's source, or None."""
        return self._chat.get("default")

    @property
    def chat_template_names(self) -> tuple[str, ...]:
        """The names of the tokenizer's own chat templates (``chat_template=<name>`` picks one)."""
        return self._chat.names

    def set_chat_template(self, source: str, origin: str = "--chat-template") -> None:
        """Replace the model's chat templates with ``source`` (the operator's ``--chat-template``):
        it becomes the only one, used with and without tools. Raises ``ValueError`` if it is not
        valid Jinja."""
        chat = ChatTemplates({"default": source}, self._special_tokens, f"{origin} for {self._source}")
        chat.check()
        self._chat = chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages`` into a prompt string, as ``transformers``' ``apply_chat_template(...,
        tokenize=False)`` does. ``extra`` become template variables (e.g. ``enable_thinking=False``);
        ``chat_template`` picks a named template or supplies one. Encode the result with
        ``encode(prompt)``: a BOS the template wrote is not doubled."""
        return self._chat.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            chat_template=chat_template,
            extra=extra,
        )

    def __repr__(self) -> str:
        return f"Tokenizer(source={self._source!r}, vocab_size={self._vocab_size})"

    # -- helpers --------------------------------------------------------------------------------

    def _named_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file's top-level object ({} if the file does not exist); ``ValueError`` if it cannot
    be read or is not an object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_ids(value: Any, path: Path) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of token ids, got {value!r}")
    return list(values)


def _special_tokens(config: Mapping[str, Any], path: Path) -> dict[str, str]:
    # Every `*_token` entry holding a token is a named special token, as in transformers: bos, eos,
    # pad, unk... and model-specific ones such as image_token. All of them reach the template.
    tokens = {}
    for key, value in config.items():
        if not key.endswith("_token") or value is None:
            continue
        if isinstance(value, dict):  # a serialized AddedToken: {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
        elif key in _STANDARD_SPECIAL_TOKENS:
            raise ValueError(
                f"{path}: {key} must be a string or an object with a 'content' string, got {value!r}"
            )
        # Other keys that merely end in "_token" (flags, numbers) are not tokens; transformers skips them too.
    return tokens


def _chat_templates(root: Path, config: Mapping[str, Any]) -> dict[str, str]:
    # Template files take priority over tokenizer_config.json entries, as in transformers.
    from_files: dict[str, str] = {}
    if (root / _CHAT_TEMPLATE_FILE).is_file():
        from_files["default"] = _read_text(root / _CHAT_TEMPLATE_FILE)
    if (root / _CHAT_TEMPLATE_DIR).is_dir():
        for file in sorted((root / _CHAT_TEMPLATE_DIR).glob("*.jinja")):
            from_files[file.name.removesuffix(".jinja")] = _read_text(file)
    if from_files:
        return from_files

    raw = config.get("chat_template")
    where = root / "tokenizer_config.json"
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):
        templates = {}
        for entry in raw:
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ValueError(
                    f"{where}: chat_template list entries must be {{'name': str, 'template': str}}, got {entry!r}"
                )
            templates[entry["name"]] = entry["template"]
        return templates
    raise ValueError(
        f"{where}: chat_template must be a string or a list of named templates, got {type(raw).__name__}"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
