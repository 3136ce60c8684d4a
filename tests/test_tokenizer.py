"""Tokenizer loading, chat-template parity with transformers, streaming detokenization, stop strings.

Every tokenizer here is trained in the test on a tiny corpus (nothing is downloaded): a byte-level
BPE (GPT-2/Llama-3/Qwen style) whose small vocabulary splits accented letters, CJK and emoji
across tokens, a Llama-2 style BPE with Metaspace and byte fallback, and a Unigram with a
Metaspace pre-tokenizer and decoder (T5 style).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from quire.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from quire.tokenizer.chat_template import ChatTemplates
from quire.tokenizer.template_limits import RenderLimits, TemplateLimitError

CORPUS = [
    "the end of the story is near, the end of the road.",
    "Hello world! Hello there, how are you doing today? I am fine.",
    "café naïve résumé Ångström über straße façade crème brûlée",
    "東京は日本の首都です。你好世界，北京欢迎你。",
    "emoji time 👋🌍🎉 and 👩‍💻 coding 🚀 done",
] * 20
# Text drawn from this alphabet is valid UTF-8 that tokenizes into split multi-byte characters.
ALPHABET = "abcdefghijklmnopqrstuvwxyz  ,.!?éèçßñÅü東京日本你好世界欢迎👋🌍🎉🚀😀"
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

CHATML = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(turns=0) %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role == 'system' %}{% continue %}{% endif %}\n"
    "  {%- if message.role not in ['user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + message.role) }}{% endif %}\n"
    "  {%- set ns.turns = ns.turns + 1 %}\n"
    "  <|im_start|>{{ message.role }}\n"
    "  {%- if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif %}\n"
    "  {{ message.content }}<|im_end|>\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
    "{%- if documents is not none %}docs{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
GENERATION_TAG = (
    "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}{{ strftime_now('%Y') }}"
)


# -- building tokenizers ------------------------------------------------------------------------


def _byte_level_backend() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _llama2_backend() -> HFTokenizer:
    """BPE over Metaspace words with byte fallback and Llama 2's normalizer/decoder/post-processor."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=specials, limit_alphabet=40, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    # Insert the 256 byte pieces right after the special tokens, as SentencePiece lays them out.
    trained = [
        t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in specials
    ]
    ordered = specials + [f"<0x{b:02X}>" for b in range(256)] + trained
    data["model"]["vocab"] = {token: i for i, token in enumerate(ordered)}
    data["model"]["byte_fallback"] = True
    data["pre_tokenizer"] = None
    tok = HFTokenizer.from_str(json.dumps(data))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _unigram_backend() -> HFTokenizer:
    tok = HFTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _save(directory: Path, backend: HFTokenizer, config: dict[str, Any], **extra_files: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, content in extra_files.items():
        path = directory / name.replace("__", ".")
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    backend = _byte_level_backend()
    config = {
        "bos_token": None,
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "special": True},
        "pad_token": "<|endoftext|>",
        "image_token": "<|endoftext|>",  # model-specific named tokens reach the template too
        "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    end_of_text = backend.token_to_id("<|endoftext|>")
    return _save(
        tmp_path_factory.mktemp("byte"),
        backend,
        config,
        generation_config__json={"eos_token_id": [end_of_text, backend.token_to_id("<|im_end|>")]},
        config__json={"eos_token_id": 7, "text_config": {"eos_token_id": [8]}},
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": LLAMA2}
    return _save(
        tmp_path_factory.mktemp("llama"), _llama2_backend(), config, config__json={"eos_token_id": 2}
    )


@pytest.fixture(scope="module")
def byte_tok(byte_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(byte_dir)


@pytest.fixture(scope="module")
def llama_tok(llama_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(llama_dir)


@pytest.fixture(scope="module")
def unigram_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(
        _save(tmp_path_factory.mktemp("unigram"), _unigram_backend(), {"eos_token": "</s>"})
    )


def _hf(directory: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


# -- loading and encoding -----------------------------------------------------------------------


def test_eos_ids_gathered_from_every_source(byte_tok: Tokenizer) -> None:
    im_end, end_of_text = byte_tok.token_to_id("<|im_end|>"), byte_tok.token_to_id("<|endoftext|>")
    assert byte_tok.eos_token_id == im_end  # from the AddedToken dict form
    assert byte_tok.eos_token_ids == frozenset({im_end, end_of_text, 7, 8})
    assert byte_tok.bos_token_id is None
    assert byte_tok.pad_token_id == end_of_text
    assert {im_end, end_of_text} <= byte_tok.all_special_ids
    assert byte_tok.vocab_size == 330
    assert byte_tok.id_to_token(byte_tok.token_to_id("<|im_start|>")) == "<|im_start|>"


def test_load_errors_name_the_problem(tmp_path: Path, byte_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid tokenizers file"):
        Tokenizer.from_dir(tmp_path)

    def broken(name: str, content: str) -> Path:
        directory = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        directory.mkdir()
        (directory / "tokenizer.json").write_bytes((byte_dir / "tokenizer.json").read_bytes())
        (directory / name).write_text(content, encoding="utf-8")
        return directory

    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(broken("tokenizer_config.json", "[1, 2"))
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer.from_dir(broken("generation_config.json", '{"eos_token_id": "two"}'))
    with pytest.raises(ValueError, match="chat_template list entries"):
        Tokenizer.from_dir(broken("tokenizer_config.json", '{"chat_template": [{"name": "default"}]}'))
    with pytest.raises(ValueError, match="eos_token must be a string"):
        Tokenizer.from_dir(broken("tokenizer_config.json", '{"eos_token": 5}'))
    with pytest.raises(ValueError, match="add_bos_token"):
        Tokenizer.from_dir(broken("tokenizer_config.json", '{"add_bos_token": "yes"}'))


def test_encode_matches_transformers_and_never_doubles_bos(llama_dir: Path, llama_tok: Tokenizer) -> None:
    hf = _hf(llama_dir)
    for text in ["Hello world", "café 東京 👋", "", " leading space"]:
        assert llama_tok.encode(text) == hf.encode(text)
        assert llama_tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        assert llama_tok.decode(llama_tok.encode(text)) == hf.decode(
            hf.encode(text), skip_special_tokens=True
        )
    bos = llama_tok.bos_token_id
    assert llama_tok.encode("Hello")[0] == bos
    # The post-processor adds BOS and the text (as a chat template renders it) has one too.
    assert llama_tok.encode("<s>[INST] hi [/INST]")[:2] != [bos, bos]
    assert llama_tok.encode("<s>hi", add_special_tokens=False)[0] == bos


@pytest.mark.parametrize("add_bos_token", [True, False, None])
def test_add_bos_token_when_the_post_processor_adds_none(tmp_path: Path, add_bos_token: bool | None) -> None:
    config: dict[str, Any] = {"bos_token": "<|bos|>", "eos_token": "<|endoftext|>"}
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    tok = Tokenizer.from_dir(_save(tmp_path, _byte_level_backend(), config))
    bos = tok.bos_token_id
    ids = tok.encode("Hello world")
    assert (ids[0] == bos) is bool(add_bos_token)
    assert ids[int(bool(add_bos_token)) :] == tok.encode("Hello world", add_special_tokens=False)
    assert tok.encode("<|bos|>Hello")[:2] != [bos, bos]
    assert bos not in tok.encode("Hello", add_special_tokens=False)


def test_decode_skips_special_tokens(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("<|im_start|>Hello<|im_end|>")
    assert byte_tok.decode(ids) == "Hello"
    assert byte_tok.decode(ids, skip_special_tokens=False) == "<|im_start|>Hello<|im_end|>"
    assert byte_tok.decode(ids + [10_000]) == "Hello"  # padded-vocabulary ids decode to nothing


# -- chat templates -----------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there <b>&</b> café"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": " 4 ", "reasoning_content": "easy"},
        {"role": "user", "content": "And 東京?"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning": "r"}],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in <city> & région",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(
    byte_dir: Path, byte_tok: Tokenizer, add_generation_prompt: bool, conversation: int
) -> None:
    hf = _hf(byte_dir)
    messages = CONVERSATIONS[conversation]
    for kwargs in [
        {},
        {"tools": TOOLS},
        {"enable_thinking": False},
        {"documents": [{"title": "t", "text": "x"}]},
    ]:
        expected = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        got = byte_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        assert got == expected, kwargs
    assert "<b>&</b>" in byte_tok.apply_chat_template(CONVERSATIONS[0])
    assert '"Weather in <city> & région"' in byte_tok.apply_chat_template(CONVERSATIONS[0], tools=TOOLS)


def test_llama2_template_matches_transformers_and_encodes_one_bos(
    llama_dir: Path, llama_tok: Tokenizer
) -> None:
    hf = _hf(llama_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "東京?"},
    ]
    for add_generation_prompt in (True, False):
        for conversation in (messages, messages[1:]):
            expected = hf.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert llama_tok.apply_chat_template(conversation, add_generation_prompt) == expected
    ids = llama_tok.encode(llama_tok.apply_chat_template(messages))
    assert ids[0] == llama_tok.bos_token_id and ids[1] != llama_tok.bos_token_id
    with pytest.raises(ValueError, match="roles must alternate"):
        llama_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_template_sources_and_selection(tmp_path: Path, byte_dir: Path) -> None:
    backend = HFTokenizer.from_file(str(byte_dir / "tokenizer.json"))
    listed = [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T"},
    ]
    tok = Tokenizer.from_dir(_save(tmp_path / "list", backend, {"chat_template": listed}))
    hi = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(hi) == "Dhi"
    assert tok.apply_chat_template(hi, tools=TOOLS) == "T"
    assert tok.apply_chat_template(hi, chat_template="tool_use") == "T"
    assert tok.apply_chat_template(hi, chat_template="X{{ messages | length }}") == "X1"

    # A chat_template.jinja file overrides the config, as in transformers.
    directory = _save(
        tmp_path / "file", backend, {"chat_template": "config"}, chat_template__jinja=GENERATION_TAG
    )
    tok, hf = Tokenizer.from_dir(directory), _hf(directory)
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert tok.apply_chat_template(conversation, add_generation_prompt) == expected

    no_default = Tokenizer.from_dir(_save(tmp_path / "nodefault", backend, {"chat_template": listed[1:]}))
    with pytest.raises(ValueError, match="none named .default."):
        no_default.apply_chat_template(hi)
    no_template = Tokenizer.from_dir(_save(tmp_path / "none", backend, {}))
    with pytest.raises(ValueError, match="has no chat template"):
        no_template.apply_chat_template(hi)
    bad = Tokenizer.from_dir(_save(tmp_path / "bad", backend, {"chat_template": "{% for %}"}))
    with pytest.raises(ValueError, match="not valid Jinja"):
        bad.apply_chat_template(hi)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ("hello", "must be a list"),
        ([], "must not be empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\] needs a 'role'"),
        (
            [{"role": "user", "content": "a"}, {"role": "user"}],
            r"messages\[1\] \(role 'user'\) has no 'content'",
        ),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "user", "content": object()}], "JSON-like"),
    ],
)
def test_malformed_messages_are_rejected(byte_tok: Tokenizer, messages: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        byte_tok.apply_chat_template(messages)


def test_template_sandbox_and_errors(byte_tok: Tokenizer) -> None:
    hi = [{"role": "user", "content": "hi"}]
    tool_call = [{"role": "assistant", "tool_calls": [{"id": "1"}]}]
    assert byte_tok.apply_chat_template(tool_call, chat_template="{{ messages[0].tool_calls[0].id }}") == "1"
    assert byte_tok.apply_chat_template(hi, chat_template="{{ image_token }}{{ eos_token }}") == (
        "<|endoftext|><|im_end|>"
    )
    with pytest.raises(ValueError, match="unknown role"):
        byte_tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="rejected"):  # the sandbox refuses Python internals
        byte_tok.apply_chat_template(hi, chat_template="{{ messages.__class__.__mro__ }}{{ ''.__class__() }}")
    with pytest.raises(ValueError, match="rejected"):
        byte_tok.apply_chat_template(hi, chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(ValueError, match="rejected"):  # immutable: templates cannot edit the caller's data
        byte_tok.apply_chat_template(hi, chat_template="{{ messages.append(1) }}")


HI = [{"role": "user", "content": "hi"}]
# Each would take seconds to hours, or gigabytes, without the render limits; each is refused at once.
HOSTILE_TEMPLATES = [
    ("{% for i in range(100000) %}{% endfor %}", "range"),
    ("{{ 'a' * 10**9 }}", "'\\*' would build"),
    ("{{ 10 ** 1000000 }}", "integer of about"),
    (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "'~'",
    ),
    (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "'\\+'",
    ),
    ("{{ 'a'|center(1000000000) }}", "integer 1000000000"),
    ("{{ 'a'.ljust(1000000000) }}", "integer 1000000000"),
    ("{{ '%0999999999d' % 1 }}", "width"),
    ("{{ '{:0999999999}'.format(1) }}", "width"),
    ("{{ '{:{}}'.format(1, 999999999) }}", "integer 999999999"),
    ("{% for i in range(10000) %}{{ 'x' * 5000 }}{% endfor %}", "output limit"),
    ("{% for i in range(10000) %}{% set s = 'x' * 20000 %}{% endfor %}", "work limit"),
    # A list holding one long string many times is small in memory; its text is not.
    ("{% set l = ['x' * 1000000] * 10000 %}{{ l }}", "'{{ }}' would build"),
    ("{% set l = ['x' * 1000000] * 10000 %}{{ l|tojson }}", "'|tojson' would build"),
    ("{% set l = ['x' * 1000000] * 10000 %}{{ '' ~ l }}", "'~' would build"),
    ("{% set l = ['x' * 1000000] * 10000 %}{{ ''.join(l) }}", "'str method' would build"),
    ("{% set b = 'x' * 1000000 %}{{ range(10000)|join(b) }}", "'|join' would build"),
    ("{% set b = 'x' * 1000000 %}{{ ('%s' * 1000) % ((b,) * 1000) }}", "'%' would build"),
    ("{% set b = '\\n' * 1000000 %}{{ b|indent(65536) }}", "'|indent' would build"),
    ("{% set b = 'x' * 1000000 %}{{ b.replace('x', 'yyyyyyyyyyyy') }}", "'str method' would build"),
    ("{{ []|slice(1000000) }}", "integer 1000000"),
    # Python-level work per item, which no deadline check interrupts.
    ("{{ [0] * 8000000 }}", "sequence of 8000000 items"),
    ("{{ ('a' * 8000000)|list|sort|length }}", "filter 'list' was given 8000000 items"),
    ("{{ ([[0] * 1000] * 80)|sum(start=[])|length }}", "'sum' only adds numbers"),
]


@pytest.mark.parametrize(("template", "error"), HOSTILE_TEMPLATES)
def test_hostile_template_steps_are_bounded(template: str, error: str) -> None:
    templates = ChatTemplates({}, {}, "test")
    started = time.monotonic()
    with pytest.raises(TemplateLimitError, match=error):
        templates.render(HI, add_generation_prompt=True, tools=None, chat_template=template, extra={})
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    "template",
    [
        # Loops that build nothing: only the deadline can stop them.
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
        "{% for c in 'a' * 8000000 %}{% endfor %}",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
        # Per-item work inside a filter: checked at each item's filter call.
        "{{ ([0] * 100000)|map('string')|map('string')|map('string')|list|length }}",
    ],
)
def test_template_render_time_limit(template: str) -> None:
    templates = ChatTemplates({}, {}, "test", RenderLimits(max_seconds=0.2, max_items=1_000_000))
    started = time.monotonic()
    with pytest.raises(TemplateLimitError, match="time limit of 0.2 s"):
        templates.render(HI, add_generation_prompt=True, tools=None, chat_template=template, extra={})
    assert time.monotonic() - started < 1.0
    # The same environment renders the next template normally: the budget was the render's own.
    assert templates.render(HI, add_generation_prompt=True, tools=None, chat_template="ok", extra={}) == "ok"


def test_concurrent_renders_have_their_own_budgets() -> None:
    templates = ChatTemplates(
        {"default": "{{ messages[0].content }}"}, {}, "test", RenderLimits(max_seconds=0.5)
    )
    endless = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(
            templates.render, HI, add_generation_prompt=True, tools=None, chat_template=endless, extra={}
        )
        time.sleep(0.1)
        # Renders in other threads meanwhile are neither slowed to a halt nor charged the other's time.
        for _ in range(20):
            assert (
                templates.render(HI, add_generation_prompt=True, tools=None, chat_template=None, extra={})
                == "hi"
            )
        with pytest.raises(TemplateLimitError, match="time limit of 0.5 s"):
            slow.result(timeout=5)


def test_template_limits_leave_normal_templates_alone(byte_tok: Tokenizer) -> None:
    long_chat = [{"role": "user", "content": "word " * 2000}] * 50
    text = byte_tok.apply_chat_template(long_chat)
    assert text.count("word") == 100_000
    assert byte_tok.apply_chat_template(HI, chat_template="{{ range(10000)|length }}") == "10000"
    deep = "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(5000) }}"
    with pytest.raises(ValueError, match="recursed too deeply"):
        byte_tok.apply_chat_template(HI, chat_template=deep)
    with pytest.raises(TemplateLimitError, match="characters; the limit is"):
        byte_tok.apply_chat_template(HI, chat_template="x" * (RenderLimits().max_source_chars + 1))
    with pytest.raises(ValueError, match="max_seconds must be a positive number"):
        RenderLimits(max_seconds=0)


@pytest.mark.parametrize(
    "name", ["messages", "add_generation_prompt", "tools", "eos_token", "raise_exception"]
)
def test_template_arguments_cannot_replace_fixed_variables(name: str) -> None:
    # Before: special tokens and the template's functions were silently replaced, and in the server
    # `messages` / `add_generation_prompt` in chat_template_kwargs were a TypeError (a 500).
    templates = ChatTemplates({"default": "{{ messages | length }}"}, {"eos_token": "</s>"}, "test")
    with pytest.raises(ValueError, match=f"'{name}' is set by"):
        templates.render(HI, add_generation_prompt=True, tools=None, chat_template=None, extra={name: []})
    normal = {"enable_thinking": False, "documents": [{"text": "d"}]}
    assert (
        templates.render(HI, add_generation_prompt=True, tools=None, chat_template=None, extra=normal) == "1"
    )


# -- incremental detokenizer --------------------------------------------------------------------


def _stream(
    tokenizer: Tokenizer, ids: list[int], prompt: list[int] | None = None, chunk: int = 1, **kw: Any
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt or [], **kw)
    deltas = [detok.add_tokens(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.finish()]


@SETTINGS
@given(data=st.data())
def test_byte_level_stream_equals_decode_for_any_ids(byte_tok: Tokenizer, data: st.DataObject) -> None:
    ids_strategy = st.lists(st.integers(0, byte_tok.vocab_size - 1), max_size=40)
    ids, prompt = data.draw(ids_strategy), data.draw(ids_strategy)
    skip = data.draw(st.booleans())
    chunk = data.draw(st.integers(1, 4))
    deltas = _stream(byte_tok, ids, prompt, chunk, skip_special_tokens=skip)
    # Holds for invalid byte sequences too: finish() flushes them exactly as decode renders them.
    assert "".join(deltas) == byte_tok.decode(ids, skip_special_tokens=skip)


@SETTINGS
@given(text=st.text(alphabet=ALPHABET, max_size=60), prompt=st.text(alphabet=ALPHABET, max_size=20))
def test_byte_level_stream_of_valid_text_never_splits_a_character(
    byte_tok: Tokenizer, text: str, prompt: str
) -> None:
    ids = byte_tok.encode(text, add_special_tokens=False)
    deltas = _stream(byte_tok, ids, byte_tok.encode(prompt))
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == text


@SETTINGS
@given(text=st.text(alphabet=ALPHABET, max_size=60), prompt=st.text(alphabet=ALPHABET, max_size=20))
def test_sentencepiece_stream_keeps_spaces_and_characters(
    llama_tok: Tokenizer, text: str, prompt: str
) -> None:
    ids = llama_tok.encode(text, add_special_tokens=False)
    deltas = _stream(llama_tok, ids)
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == llama_tok.decode(ids)
    # After a prompt, the output's text is what it adds to the prompt: a leading "▁" is a space.
    prompt_ids = llama_tok.encode(prompt)
    joined = "".join(_stream(llama_tok, ids, prompt_ids))
    assert llama_tok.decode(prompt_ids) + joined == llama_tok.decode(prompt_ids + ids)


@SETTINGS
@given(data=st.data())
def test_metaspace_stream_equals_decode_for_any_ids(
    llama_tok: Tokenizer, unigram_tok: Tokenizer, data: st.DataObject
) -> None:
    for tok in (llama_tok, unigram_tok):
        # Byte-fallback pieces excluded: an invalid run of them is rewritten wholesale by the
        # decoder (see the detokenizer's docstring); valid runs are covered by the test above.
        byte_pieces = {tok.token_to_id(f"<0x{b:02X}>") for b in range(256)}
        usable = sorted(set(range(tok.vocab_size)) - byte_pieces)
        ids = data.draw(st.lists(st.sampled_from(usable), max_size=30))
        skip = data.draw(st.booleans())
        assert "".join(_stream(tok, ids, skip_special_tokens=skip)) == tok.decode(
            ids, skip_special_tokens=skip
        )


def test_first_output_token_gets_its_space_from_the_prompt(llama_tok: Tokenizer) -> None:
    prompt = llama_tok.encode("Hello")
    ids = llama_tok.encode("Hello world", add_special_tokens=False)[len(prompt) - 1 :]
    assert llama_tok.id_to_token(ids[0]).startswith("▁")
    assert "".join(_stream(llama_tok, ids, prompt)) == " world"
    assert "".join(_stream(llama_tok, ids)) == "world"  # no prompt: same as decode(ids)


def test_utf8_hold_back_and_release(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("a👋b", add_special_tokens=False)
    assert len(ids) >= 4  # the emoji's four bytes span several tokens
    detok = IncrementalDetokenizer(byte_tok, [])
    deltas = [detok.add_tokens([i]) for i in ids]
    assert deltas[0] == "a" and "👋" in deltas and deltas[-1] == "b"
    assert sum(1 for d in deltas if d == "") == len(ids) - 3
    # Bytes that never complete a character are released by finish(), as decode shows them.
    detok = IncrementalDetokenizer(byte_tok, [])
    assert detok.add_tokens(ids[:2]) == "a"
    assert detok.finish() == byte_tok.decode(ids[1:2]) == "\ufffd"


def test_special_tokens_in_the_stream(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("Hi<|im_end|> there<|endoftext|>", add_special_tokens=False)
    assert "".join(_stream(byte_tok, ids)) == "Hi there"
    assert "".join(_stream(byte_tok, ids, skip_special_tokens=False)) == "Hi<|im_end|> there<|endoftext|>"


def test_each_step_decodes_a_bounded_window(byte_tok: Tokenizer, llama_tok: Tokenizer) -> None:
    for tok in (byte_tok, llama_tok):
        prompt = tok.encode("Hello there, how are you?")
        ids = tok.encode(" ".join(CORPUS[:5]) * 4, add_special_tokens=False)
        assert len(ids) > 300
        detok = IncrementalDetokenizer(tok, prompt)
        lengths: list[int] = []
        real_decode = tok.decode

        def spy(token_ids: Any, skip_special_tokens: bool = True, *, _seen: list[int] = lengths) -> str:
            _seen.append(len(token_ids))
            return real_decode(token_ids, skip_special_tokens)  # noqa: B023 - called inside this iteration

        tok.decode = spy  # type: ignore[method-assign]
        try:
            text = "".join(detok.add_tokens([i]) for i in ids) + detok.finish()
        finally:
            del tok.decode
        assert max(lengths) <= 12  # O(1) per token: a few tokens decoded, not the whole output
        assert tok.decode(prompt) + text == tok.decode(prompt + ids)


# -- stop strings -------------------------------------------------------------------------------


def _run_stop(deltas: list[str], stop: list[str], include: bool = False) -> tuple[str, str | None, int]:
    matcher = StopStringMatcher(stop, include_stop_str_in_output=include)
    out = []
    for delta in deltas:
        text, matched = matcher.feed(delta)
        out.append(text)
        if matched is not None:
            return "".join(out), matched, matcher.truncated_chars
    return "".join(out) + matcher.flush(), None, matcher.truncated_chars


def test_stop_string_spanning_tokens(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("the end of the story", add_special_tokens=False)
    assert [byte_tok.decode([i]) for i in ids[:3]] == ["the", " end", " of"]
    detok, matcher = IncrementalDetokenizer(byte_tok, []), StopStringMatcher(["end of"])
    emitted, matched = [], None
    for token_id in ids:
        text, matched = matcher.feed(detok.add_tokens([token_id]))
        emitted.append(text)
        if matched:
            break
    # "e" might start "end of", so it waits; " " then rules the stop out for it.
    assert matched == "end of" and emitted == ["th", "e ", ""]
    assert matcher.truncated_chars == len("end of")


def test_stop_at_the_very_start() -> None:
    assert _run_stop(["STOP and more"], ["STOP"]) == ("", "STOP", len("STOP and more"))
    assert _run_stop(["ST", "OP", "x"], ["STOP"]) == ("", "STOP", 4)
    assert _run_stop(["STOP!"], ["STOP"], include=True) == ("STOP", "STOP", 1)


def test_overlapping_candidate_prefixes() -> None:
    matcher = StopStringMatcher(["ab"])
    assert matcher.feed("a") == ("", None)
    assert matcher.feed("a") == ("a", None)
    assert matcher.feed("b") == ("", "ab")
    assert _run_stop(["aab"], ["ab"]) == ("a", "ab", 2)
    assert _run_stop(["a", "a", "a", "c"], ["aab"]) == ("aaac", None, 0)
    assert _run_stop(list("xaaab"), ["aaab"]) == ("x", "aaab", 4)


def test_multiple_stop_strings_earliest_wins() -> None:
    assert _run_stop(["hello world"], ["world", "lo w"]) == ("hel", "lo w", 8)
    assert _run_stop(list("hello world"), ["world", "lo w"]) == ("hel", "lo w", 4)
    # One stop inside another: the one complete first in the stream wins, however text is split.
    assert _run_stop(["abcd"], ["abcd", "bc"]) == ("a", "bc", 3)
    assert _run_stop(list("abcd"), ["abcd", "bc"]) == ("a", "bc", 2)


def test_include_stop_str_in_output_and_truncation_count() -> None:
    assert _run_stop(["say hi and", " bye"], ["hi"], include=True) == ("say hi", "hi", len(" and"))
    full = "I said stop, then went on"
    out, matched, truncated = _run_stop([full[:9], full[9:]], ["stop"])
    assert (out, matched) == ("I said ", "stop") and full[: len(full) - truncated] == out


def test_held_back_text_flushed_at_finish() -> None:
    matcher = StopStringMatcher(["abc", "xyz"])
    assert matcher.feed("11ab") == ("11", None)
    assert matcher.held_chars == 2
    assert matcher.flush() == "ab"
    assert matcher.flush() == ""
    assert _run_stop(["no stop here"], ["abc"]) == ("no stop here", None, 0)
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher([""])
    finished = StopStringMatcher(["x"])
    finished.feed("x")
    with pytest.raises(ValueError, match="already matched"):
        finished.feed("more")


def test_multi_byte_stop_strings(byte_tok: Tokenizer) -> None:
    for text, stop, before in [
        ("go 👋 now", "👋", "go "),
        ("你好東京です", "東京", "你好"),
        ("crème brûlée", "ûl", "crème br"),
    ]:
        ids = byte_tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(byte_tok, [])
        assert _run_stop([detok.add_tokens([i]) for i in ids], [stop])[:2] == (before, stop)


@SETTINGS
@given(
    text=st.text(alphabet="ab c", max_size=30),
    stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30)),
    include=st.booleans(),
)
def test_stop_matching_does_not_depend_on_delta_boundaries(
    text: str, stops: list[str], cuts: list[int], include: bool
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    # Reference: the occurrence that ends first (longest on a tie), found on the whole text.
    found = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if found:
        end, neg_len, stop = min(found)
        expected = text[: end if include else end + neg_len]
        fed = min(b for b in bounds if b >= end)  # feeding stops with the delta that completed it
        assert _run_stop(deltas, stops, include) == (expected, stop, fed - len(expected))
    else:
        assert _run_stop(deltas, stops, include) == (text, None, 0)
