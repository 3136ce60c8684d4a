"""Tiny random-weight checkpoints in the Hugging Face layout, for tests and the built-in demo.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here, deterministically, on a
corpus generated in code (English words, invented words, and multi-byte text: accented Latin,
Greek, Cyrillic, CJK, emoji), so detokenization tests meet tokens that split UTF-8 characters.
The checkpoints load unchanged in ``transformers`` for parity tests.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from quire import __version__
from quire.cache_dir import quire_cache_dir

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_END)  # trained first, so their ids are 0, 1, 2
# 256 byte symbols + the specials: below this there is nothing left to merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# Bump when the recipe changes so that cached demo checkpoints are rebuilt.
DEMO_REVISION = 1

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time could "
    "no make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know get through back much before go good "
    "new write our used me man day too any same right look think also around another came come work "
    "three word must because does part even place well such here take why things help put years "
    "different away again off went old number great tell men say small every found still between "
    "name should home big give air line set own under read last never us left end along while might "
    "next sound below saw something thought both few those always looked show large often together "
    "asked house world going want school important until form food keep children feet land side "
    "without boy once animals life enough took sometimes four head above kind began almost live page "
    "got earth need far hand high year mother light parts country father let night following picture "
    "being study second eyes soon times story boys since white days ever paper hard near sentence "
    "better best across during today others however sure means knew try told young miles sun ways "
    "thing whole hear example heard several change answer room sea against top turned learn point "
    "city play toward five using himself usually model server token cache block request stream"
).split()
_MULTIBYTE = (
    "café naïve résumé façade Zürich São Paulo crème brûlée jalapeño smörgåsbord",
    "Ελληνικά γράμματα και λέξεις",
    "Привет, мир! Как дела?",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "日本語のテキストです。東京は大きな都市です。",
    "안녕하세요 세계, 반갑습니다",
    "emoji 🙂 🚀 🎉 👍🏽 ❤️ 🌍 🐍 ✨",
    "math ∑ ∞ ≈ ≠ √ π → ← ∂",
)
_SYLLABLE_ONSETS = (
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "st",
    "tr",
)
_SYLLABLE_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou", "ee")
_CORPUS_LINES = 4000


def demo_corpus() -> list[str]:
    """The deterministic training text of the demo tokenizer (same on every machine)."""
    rng = random.Random(1234)
    invented = [
        "".join(rng.choice(_SYLLABLE_ONSETS) + rng.choice(_SYLLABLE_NUCLEI) for _ in range(rng.randint(2, 4)))
        for _ in range(600)
    ]
    lines = []
    for i in range(_CORPUS_LINES):
        vocabulary = _WORDS if i % 3 else invented
        words = [rng.choice(vocabulary) for _ in range(rng.randint(4, 14))]
        line = " ".join(words).capitalize() + rng.choice(".!?,;:")
        if i % 4 == 0:
            line += " " + rng.choice(_MULTIBYTE)
        if i % 6 == 0:
            line += f" {rng.randint(0, 10 ** rng.randint(1, 6))}"
        lines.append(line)
    return lines


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Train the demo byte-level BPE tokenizer with exactly ``vocab_size`` tokens (ids 0-2 special)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(demo_corpus(), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the built-in corpus only supports a vocabulary of {tokenizer.get_vocab_size()} tokens; "
            f"asked for {vocab_size}"
        )
    return tokenizer


@dataclass(frozen=True)
class _ArchSpec:
    architecture: str
    model_type: str
    qkv_bias: bool  # always present (Qwen2)
    qk_norm: bool  # Qwen3
    extra: MappingProxyType[str, Any]


_ARCHS = MappingProxyType(
    {
        "llama": _ArchSpec("LlamaForCausalLM", "llama", False, False, MappingProxyType({"mlp_bias": False})),
        # Mistral v0.1 shipped a 4096-token sliding window; shorter sequences are unaffected.
        "mistral": _ArchSpec(
            "MistralForCausalLM", "mistral", False, False, MappingProxyType({"sliding_window": 4096})
        ),
        "qwen2": _ArchSpec(
            "Qwen2ForCausalLM",
            "qwen2",
            True,
            False,
            MappingProxyType({"use_sliding_window": False, "sliding_window": None, "max_window_layers": 0}),
        ),
        "qwen3": _ArchSpec(
            "Qwen3ForCausalLM",
            "qwen3",
            False,
            True,
            MappingProxyType({"use_sliding_window": False, "sliding_window": None, "max_window_layers": 0}),
        ),
    }
)


def build_random_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 512,
    tie_word_embeddings: bool = True,
    attention_bias: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    rope_format: str = "rope_scaling",
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    seed: int = 0,
    sharded: bool = False,
) -> Path:
    """Write a random-weight checkpoint plus tokenizer to ``out_dir`` and return it.

    ``arch`` is one of llama, mistral, qwen2, qwen3. ``rope_scaling`` is a transformers scaling
    dict (``{"rope_type": "linear", "factor": 2.0}``); ``rope_format`` picks how RoPE is spelled
    in config.json: ``"rope_scaling"`` (transformers 4: top-level ``rope_theta`` + ``rope_scaling``)
    or ``"rope_parameters"`` (transformers 5). ``attention_bias`` applies to llama and qwen3.
    """
    spec = _ARCHS.get(arch)
    if spec is None:
        raise ValueError(f"unknown demo arch {arch!r}; choose one of: {', '.join(_ARCHS)}")
    if attention_bias and arch not in ("llama", "qwen3"):
        raise ValueError(f"attention_bias is a llama/qwen3 option; {arch} fixes its biases itself")
    if rope_format not in ("rope_scaling", "rope_parameters"):
        raise ValueError(f"rope_format must be 'rope_scaling' or 'rope_parameters', got {rope_format!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = head_dim or hidden_size // num_heads

    tokenizer = build_tokenizer(vocab_size)
    bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(IM_END)
    config: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        **spec.extra,
    }
    if arch in ("llama", "qwen3"):
        config["attention_bias"] = attention_bias
    if rope_format == "rope_parameters":
        scaling = dict(rope_scaling or {})
        scaling.setdefault("rope_type", scaling.pop("type", "default"))  # v5 only knows "rope_type"
        config["rope_parameters"] = {**scaling, "rope_theta": rope_theta}
    else:
        config["rope_theta"] = rope_theta
        config["rope_scaling"] = dict(rope_scaling) if rope_scaling else None

    weights = _random_weights(
        config, qkv_bias=spec.qkv_bias or attention_bias, qk_norm=spec.qk_norm, seed=seed, dtype=dtype
    )
    _write_weights(out, weights, sharded)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": [eos_id, bos_id]})
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": IM_END,
            "pad_token": BOS_TOKEN,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_position_embeddings,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    return out


def _random_weights(
    config: dict[str, Any], *, qkv_bias: bool, qk_norm: bool, seed: int, dtype: str
) -> dict[str, torch.Tensor]:
    """Seeded weights under Hugging Face names.

    Matrices use std 1/sqrt(fan_in) rather than the usual 0.02: at 0.02 a tiny model's attention
    is nearly uniform, so parity tests could not tell a RoPE or masking bug from rounding. Norm
    weights, biases and q/k norms are random too, so a mixed-up mapping changes the output.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) / math.sqrt(cols)

    def around_one(n: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(n, generator=gen)

    def bias(n: int) -> torch.Tensor:
        return 0.2 * torch.randn(n, generator=gen)

    # Embedding rows of norm ~2 keep logits (normed hidden . row) at a few units: peaked enough
    # for stable greedy parity, flat enough that generations are not a single repeated token.
    weights = {"model.embed_tokens.weight": 2.0 * matrix(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = around_one(hidden)
        for name, rows in (
            ("q_proj", heads * head_dim),
            ("k_proj", kv_heads * head_dim),
            ("v_proj", kv_heads * head_dim),
        ):
            weights[f"{p}self_attn.{name}.weight"] = matrix(rows, hidden)
            if qkv_bias:
                weights[f"{p}self_attn.{name}.bias"] = bias(rows)
        weights[p + "self_attn.o_proj.weight"] = matrix(hidden, heads * head_dim)
        if config.get("attention_bias"):
            weights[p + "self_attn.o_proj.bias"] = bias(hidden)
        if qk_norm:
            weights[p + "self_attn.q_norm.weight"] = around_one(head_dim)
            weights[p + "self_attn.k_norm.weight"] = around_one(head_dim)
        weights[p + "post_attention_layernorm.weight"] = around_one(hidden)
        weights[p + "mlp.gate_proj.weight"] = matrix(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = matrix(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = matrix(hidden, inter)
    weights["model.norm.weight"] = around_one(hidden)
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = 2.0 * matrix(config["vocab_size"], hidden)
    target = getattr(torch, dtype)
    return {name: tensor.to(target).contiguous() for name, tensor in weights.items()}


def _write_weights(out: Path, weights: dict[str, torch.Tensor], sharded: bool) -> None:
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if not sharded:
        save_file(weights, str(out / "model.safetensors"), metadata=metadata)
        return
    names = list(weights)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    weight_map = {}
    for i, shard_names in enumerate(halves, start=1):
        shard = f"model-{i:05d}-of-{len(halves):05d}.safetensors"
        save_file({n: weights[n] for n in shard_names}, str(out / shard), metadata=metadata)
        weight_map.update(dict.fromkeys(shard_names, shard))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# The demo model: big enough to look like a model (hidden 256, 4 layers, head_dim 64), small
# enough to build in about a second and run quickly on a laptop CPU.
_DEMO_SHAPE = MappingProxyType(
    {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 64,
        "vocab_size": 2048,
        "max_position_embeddings": 4096,
    }
)


def default_demo_checkpoint() -> Path:
    """The built-in demo checkpoint, built on first use into the quire cache directory.

    The cache root is ``$QUIRE_CACHE_DIR`` or ``~/.cache/quire``. The build goes to a temporary
    directory that is renamed into place, so concurrent first runs never see a half-written model.
    """
    root = quire_cache_dir()
    final = root / f"demo-{__version__}-r{DEMO_REVISION}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=root))
    try:
        build_random_checkpoint(staging, "llama", **_DEMO_SHAPE)
        try:
            staging.rename(final)
        except OSError:
            # Another process renamed its build into place first; theirs is as good as ours.
            if not (final / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final
