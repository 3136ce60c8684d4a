"""Model, loader and paged-attention tests.

Parity: logits of every architecture variant match ``transformers`` (fp32, eager attention) over
a realistic step sequence: a mixed prefill batch, decodes through the paged cache, and a chunked
prefill whose prefix is already cached; block ids are shuffled so indexing bugs cannot hide.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from quire.kernels.cpu_ops import cpu_ops
from quire.models.demo import CHAT_TEMPLATE, IM_END, build_tokenizer, default_demo_checkpoint
from quire.models.hf_config import ModelArchConfig
from quire.models.llama import apply_rope
from quire.models.loader import load_model, resolve_dtype
from quire.models.registry import resolve_model_class, supported_architectures
from quire.worker.attention import CpuPagedAttention, TorchPagedAttention, get_attention_backend
from quire.worker.attention_metadata import AttentionMetadata, PrefillChunk
from quire.worker.host_memory import advise_huge_pages
from quire.worker.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block

PARITY_ATOL = 1e-3


# ---------------------------------------------------------------------------------------------
# A hand-rolled paged allocator: what the scheduler + model runner will do, minus everything else.
# ---------------------------------------------------------------------------------------------


class PagedBatcher:
    """Assigns blocks from a shuffled pool and builds the flat step tensors + AttentionMetadata."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)  # non-contiguous, out-of-order block ids
        self.blocks: dict[int, list[int]] = {}
        self.num_cached: dict[int, int] = {}

    def _grow(self, seq: int, num_tokens: int) -> list[int]:
        blocks = self.blocks.setdefault(seq, [])
        while len(blocks) * self.block_size < num_tokens:
            blocks.append(self.free.pop())
        return blocks

    def _slots(self, seq: int, start: int, count: int) -> list[int]:
        blocks = self._grow(seq, start + count)
        return [
            blocks[p // self.block_size] * self.block_size + p % self.block_size
            for p in range(start, start + count)
        ]

    def step(
        self, decodes: list[tuple[int, int]], prefills: list[tuple[int, list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[tuple[int, int]]]:
        """Tokens for one step; also returns (seq, position) of every flat token row."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[tuple[int, int]] = []
        for seq, token in decodes:
            start = self.num_cached.get(seq, 0)
            assert start > 0, "a decode needs a cached prefix"
            ids.append(token)
            positions.append(start)
            slots += self._slots(seq, start, 1)
            rows.append((seq, start))
        max_blocks = max((len(self.blocks[s]) for s, _ in decodes), default=1)
        tables = torch.zeros(len(decodes), max_blocks, dtype=torch.long)
        for i, (seq, _) in enumerate(decodes):
            tables[i, : len(self.blocks[seq])] = torch.tensor(self.blocks[seq])
        seq_lens = torch.tensor([self.num_cached[s] + 1 for s, _ in decodes], dtype=torch.long)
        chunks = []
        for seq, tokens in prefills:
            start = self.num_cached.get(seq, 0)
            query_start = len(ids)
            ids += tokens
            positions += range(start, start + len(tokens))
            slots += self._slots(seq, start, len(tokens))
            rows += [(seq, p) for p in range(start, start + len(tokens))]
            needed = math.ceil((start + len(tokens)) / self.block_size)
            block_ids = torch.tensor(self.blocks[seq][:needed], dtype=torch.long)
            chunks.append(PrefillChunk(query_start, len(tokens), start, block_ids))
        for seq, _ in decodes:
            self.num_cached[seq] += 1
        for seq, tokens in prefills:
            self.num_cached[seq] = self.num_cached.get(seq, 0) + len(tokens)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            num_decodes=len(decodes),
            decode_block_tables=tables,
            decode_seq_lens=seq_lens,
            prefills=tuple(chunks),
            block_size=self.block_size,
        )
        return torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), meta, rows


def _run_schedule(
    model: torch.nn.Module, seqs: list[list[int]], dtype: torch.dtype = torch.float32, block_size: int = 4
) -> dict[tuple[int, int], torch.Tensor]:
    """Drive ``model`` through mixed steps; logits for every (seq, position) it computed.

    seqs[0] and seqs[1] are prefilled whole in step 1; seqs[2] is prefilled in two chunks (the
    second one beside decodes, with its prefix already cached); then everything decodes, teacher
    forced with the remaining tokens of each sequence.
    """
    batcher = PagedBatcher(num_blocks=40, block_size=block_size, seed=1)
    caches = allocate_kv_caches(model.config, 40, block_size, dtype, "cpu")
    prompt_lens = [5, 11, 17]
    split = 7
    plan: list[tuple[list[tuple[int, int]], list[tuple[int, list[int]]]]] = [
        ([], [(0, seqs[0][:5]), (1, seqs[1][:11]), (2, seqs[2][:split])]),
        ([(0, seqs[0][5]), (1, seqs[1][11])], [(2, seqs[2][split:17])]),
    ]
    cursor = {0: 6, 1: 12, 2: 17}
    while any(cursor[s] < len(seqs[s]) for s in cursor):
        decodes = [(s, seqs[s][cursor[s]]) for s in cursor if cursor[s] < len(seqs[s])]
        for s, _ in decodes:
            cursor[s] += 1
        plan.append((decodes, []))
    assert all(len(seqs[i]) > n for i, n in enumerate(prompt_lens))
    logits: dict[tuple[int, int], torch.Tensor] = {}
    with torch.inference_mode():
        for decodes, prefills in plan:
            ids, positions, meta, rows = batcher.step(decodes, prefills)
            hidden = model(ids, positions, caches, meta)
            assert hidden.shape == (len(ids), model.config.hidden_size)
            out = model.compute_logits(hidden)
            assert out.dtype == torch.float32
            for row, key in enumerate(rows):
                logits[key] = out[row]
    return logits


def _reference_logits(model_dir: Path, seqs: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        return [ref(torch.tensor([s])).logits[0].float() for s in seqs]


def _random_seqs(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------
# (a) parity with transformers
# ---------------------------------------------------------------------------------------------


# Blocks of 4 tokens take the torch prefill path on CPU; blocks of 16 the compiled prefill kernel.
@pytest.mark.parametrize("block_size", [4, 16])
def test_logits_match_transformers(
    tiny_model_dir: Callable[[str], Path], tiny_variant: str, block_size: int
) -> None:
    model_dir = tiny_model_dir(tiny_variant)
    model = load_model(model_dir, torch.float32, "cpu", progress=False)
    seqs = _random_seqs(model.config.vocab_size, [9, 15, 21])
    reference = _reference_logits(model_dir, seqs)
    ours = _run_schedule(model, seqs, block_size=block_size)
    assert len(ours) == sum(len(s) for s in seqs)  # every position computed exactly once
    worst = max((logit - reference[s][p]).abs().max().item() for (s, p), logit in ours.items())
    assert worst <= PARITY_ATOL, f"{tiny_variant}: max |logit diff| {worst:.2e} vs transformers"
    # The check is only meaningful if the logits are not flat.
    assert reference[0].std().item() > 0.5


def test_bf16_model_tracks_fp32(tiny_model_dir: Callable[[str], Path]) -> None:
    model_dir = tiny_model_dir("qwen3")
    seqs = _random_seqs(512, [9, 15, 21], seed=3)
    fp32 = _run_schedule(load_model(model_dir, torch.float32, "cpu", progress=False), seqs)
    bf16_model = load_model(model_dir, "bfloat16", "cpu", progress=False)
    assert bf16_model.model.embed_tokens.weight.dtype == torch.bfloat16
    bf16 = _run_schedule(bf16_model, seqs, dtype=torch.bfloat16)
    worst = max((bf16[k] - fp32[k]).abs().max().item() for k in fp32)
    agree = sum(bf16[k].argmax() == fp32[k].argmax() for k in fp32) / len(fp32)
    assert worst < 0.5 and agree > 0.9, (worst, agree)


# ---------------------------------------------------------------------------------------------
# (b) loader and config errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def llama_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "ckpt"))


@pytest.fixture
def sharded_copy(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir("llama-sharded"), tmp_path / "sharded"))


def _edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _edit_weights(model_dir: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _load(model_dir: Path) -> torch.nn.Module:
    return load_model(model_dir, torch.float32, "cpu", progress=False)


def test_unsupported_architecture_is_named(llama_copy: Path) -> None:
    _edit_config(llama_copy, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        _load(llama_copy)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(info.value)


def test_missing_files_are_named(llama_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        _load(tmp_path / "nope")
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights in .*ckpt"):
        _load(llama_copy)
    (llama_copy / "config.json").unlink()
    with pytest.raises(ValueError, match=r"no config\.json in .*ckpt"):
        _load(llama_copy)


def test_missing_shard_is_named(sharded_copy: Path) -> None:
    (sharded_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard model-00002-of-00002\.safetensors named in .*index\.json"):
        _load(sharded_copy)


def test_wrong_shape_names_tensor_shapes_and_file(llama_copy: Path) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:100].clone()

    _edit_weights(llama_copy, shrink)
    with pytest.raises(ValueError) as info:
        _load(llama_copy)
    message = str(info.value)
    for part in ("model.layers.1.mlp.up_proj.weight", "[100, 64]", "[128, 64]", "model.safetensors"):
        assert part in message


def test_missing_weight_is_named(llama_copy: Path) -> None:
    _edit_weights(llama_copy, lambda t: t.pop("model.layers.0.self_attn.v_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weight 'model\.layers\.0\.self_attn\.v_proj\.weight'"):
        _load(llama_copy)


def test_untied_checkpoint_requires_lm_head(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(tiny_model_dir("mistral"), tmp_path / "m"))
    _edit_weights(model_dir, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing weight 'lm_head.weight'"):
        _load(model_dir)


def test_extra_weights_error_unless_known_harmless(llama_copy: Path) -> None:
    def add_harmless(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()  # tied: duplicate is ignored

    _edit_weights(llama_copy, add_harmless)
    _load(llama_copy)
    _edit_weights(llama_copy, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.ones(2)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        _load(llama_copy)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"hidden_size": None}, r"missing the required field 'hidden_size'"),
        ({"num_key_value_heads": 3}, r"multiple of num_key_value_heads"),
        (
            {"rope_scaling": {"type": "yarn", "factor": 4.0}},
            r"rope_scaling\.rope_type 'yarn' is not supported",
        ),
        ({"rope_scaling": {"rope_type": "linear"}}, r"missing the required field 'factor'"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
        ({"vocab_size": "512"}, r"'vocab_size' must be a positive integer"),
    ],
)
def test_bad_config_fields_are_named(llama_copy: Path, changes: dict[str, object], expected: str) -> None:
    _edit_config(llama_copy, **changes)
    with pytest.raises(ValueError, match=expected) as info:
        _load(llama_copy)
    assert "config.json" in str(info.value)


def test_registry() -> None:
    assert set(supported_architectures()) >= {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    }
    assert resolve_model_class(["Foo", "Qwen3ForCausalLM"]).__name__ == "LlamaForCausalLM"
    with pytest.raises(
        ValueError, match=r"unsupported model architecture 'Foo'.*supports: .*LlamaForCausalLM"
    ):
        resolve_model_class(["Foo"])


# ---------------------------------------------------------------------------------------------
# config parsing details
# ---------------------------------------------------------------------------------------------


def _base_config(architecture: str = "LlamaForCausalLM", **extra: object) -> dict[str, object]:
    return {
        "architectures": [architecture],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
        **extra,
    }


def test_rope_spellings_agree() -> None:
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    v4 = ModelArchConfig.from_dict(_base_config(rope_theta=5e5, rope_scaling={"type": "llama3", **scaling}))
    v5 = ModelArchConfig.from_dict(
        _base_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **scaling})
    )
    assert v4.rope_scaling == v5.rope_scaling and v4.rope_theta == v5.rope_theta == 5e5
    plain = ModelArchConfig.from_dict(
        _base_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    )
    assert plain.rope_scaling is None and plain.rope_theta == 1e6
    assert ModelArchConfig.from_dict(_base_config()).rope_theta == 10000.0
    with pytest.raises(ValueError, match=r"rope_parameters\.rope_type 'dynamic'"):
        ModelArchConfig.from_dict(_base_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))


def test_architecture_flags() -> None:
    llama = ModelArchConfig.from_dict(
        _base_config(attention_bias=True, eos_token_id=[5, 6], torch_dtype="bfloat16")
    )
    assert (llama.qkv_bias, llama.o_proj_bias, llama.qk_norm) == (True, True, False)
    assert llama.num_key_value_heads == 4 and llama.head_dim == 16
    assert llama.eos_token_ids == (5, 6) and llama.torch_dtype == "bfloat16"
    qwen2 = ModelArchConfig.from_dict(_base_config("Qwen2ForCausalLM", sliding_window=4096, dtype="float16"))
    assert (qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.sliding_window, qwen2.torch_dtype) == (
        True,
        False,
        None,
        "float16",
    )
    qwen3 = ModelArchConfig.from_dict(_base_config("Qwen3ForCausalLM", head_dim=32, num_key_value_heads=2))
    assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.qkv_bias
    mistral = ModelArchConfig.from_dict(
        _base_config(
            "MistralForCausalLM", attention_bias=True, sliding_window=4096, max_position_embeddings=32768
        )
    )
    assert not mistral.qkv_bias and mistral.sliding_window == 4096 and mistral.max_context_len == 4096


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "bfloat16", "cpu") == torch.float32
    assert resolve_dtype("auto", "bfloat16", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", None, "cuda") == torch.float32
    assert resolve_dtype("float16", None, "cpu") == torch.float16
    assert resolve_dtype(torch.bfloat16, "float32", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", None, "cpu")


# ---------------------------------------------------------------------------------------------
# (c) sharded == unsharded
# ---------------------------------------------------------------------------------------------


def test_sharded_checkpoint_loads_identically(tiny_model_dir: Callable[[str], Path]) -> None:
    whole = _load(tiny_model_dir("llama"))
    sharded = _load(tiny_model_dir("llama-sharded"))
    assert len(list((tiny_model_dir("llama-sharded")).glob("model-*.safetensors"))) == 2
    for (name, a), (_, b) in zip(whole.named_parameters(), sharded.named_parameters(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------
# (d) attention backend vs a naive reference
# ---------------------------------------------------------------------------------------------


def _naive_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int
) -> torch.Tensor:
    """fp32, one query at a time; query i sits at position first_pos + i and sees keys 0..that."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    keys = keys.float().repeat_interleave(heads // kv_heads, dim=1)
    values = values.float().repeat_interleave(heads // kv_heads, dim=1)
    out = []
    for i in range(q.shape[0]):
        visible = first_pos + i + 1
        scores = torch.einsum("hd,khd->hk", q[i].float(), keys[:visible]) / math.sqrt(q.shape[-1])
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values[:visible]))
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)]
)
def test_paged_attention_matches_naive(dtype: torch.dtype, atol: float, backend: str) -> None:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, block_size = 8, 2, 16, 4
    # (cached tokens before this step, new tokens this step): three decodes, then a fresh prefill,
    # a chunk continuing mid-block, and a one-token chunk after a block-aligned prefix.
    work = [(9, 1), (3, 1), (16, 1), (0, 7), (6, 5), (8, 1)]
    batcher = PagedBatcher(num_blocks=32, block_size=block_size, seed=3)
    k_cache = torch.zeros(32, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    history = []
    for seq, (cached, _) in enumerate(work):  # fill prefixes straight into the cache
        k = torch.randn(cached, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(cached, kv_heads, head_dim, generator=gen).to(dtype)
        slots = torch.tensor(batcher._slots(seq, 0, cached), dtype=torch.long)
        k_cache.view(-1, kv_heads, head_dim)[slots] = k
        v_cache.view(-1, kv_heads, head_dim)[slots] = v
        batcher.num_cached[seq] = cached
        history.append((k, v))
    decodes = [(s, 0) for s, (_, n) in enumerate(work) if s < 3]
    prefills = [(s, [0] * n) for s, (_, n) in enumerate(work) if s >= 3]
    _, _, meta, _ = batcher.step(decodes, prefills)
    total = sum(n for _, n in work)
    q = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)

    out = get_attention_backend(backend).forward(q, k, v, k_cache, v_cache, meta, head_dim**-0.5)

    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[meta.slot_mapping], k)
    assert torch.equal(v_cache.view(-1, kv_heads, head_dim)[meta.slot_mapping], v)
    row = 0
    for seq, (cached, new) in enumerate(work):
        keys = torch.cat([history[seq][0], k[row : row + new]])
        values = torch.cat([history[seq][1], v[row : row + new]])
        expected = _naive_attention(q[row : row + new], keys, values, first_pos=cached)
        torch.testing.assert_close(out[row : row + new].float(), expected, atol=atol, rtol=0)
        row += new


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the CPU kernels")
def test_cpu_kernels_build() -> None:
    # Everything else falls back silently without them, so a broken build must fail here.
    assert cpu_ops() is not None


def test_cpu_decode_kernel_matches_torch_on_ragged_batches() -> None:
    """Many sequences of ragged lengths over shuffled blocks, GQA groups of 1 to 4."""
    if cpu_ops() is None:
        pytest.skip("CPU kernels unavailable")
    gen = torch.Generator().manual_seed(1)
    # Shapes that take the 8-key tiles with one or two 64-wide value slices, a ragged slice (96),
    # and the per-key path (head_dim not a multiple of 16, or blocks smaller than a tile).
    shapes = [(4, 4, 16, 4), (9, 3, 64, 16), (8, 2, 24, 8), (4, 2, 128, 32), (6, 2, 96, 8), (2, 1, 32, 1)]
    for heads, kv_heads, head_dim, block_size in shapes:
        num_blocks, num_seqs = 200, 12
        k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
        v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
        seq_lens = torch.randint(1, 7 * block_size, (num_seqs,), generator=gen)
        max_blocks = int((seq_lens.max() + block_size - 1) // block_size)
        tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks].view(num_seqs, max_blocks)
        q = torch.randn(num_seqs, heads, head_dim, generator=gen)
        meta = AttentionMetadata(torch.empty(0, dtype=torch.long), num_seqs, tables, seq_lens, (), block_size)
        expected = TorchPagedAttention._decode(q, k_cache, v_cache, meta, 0.3)
        got = CpuPagedAttention._decode(q, k_cache, v_cache, meta, 0.3)
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(9, 3, 64, 16), (4, 4, 32, 16), (8, 2, 128, 32), (6, 1, 96, 16)],
)
def test_cpu_prefill_kernel_matches_torch_on_mixed_steps(
    heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    """Decodes beside prefill chunks: fresh prompts across the 16-token tile and block edges, and
    chunks that continue a cached prefix mid-block; q is a strided view, as the fused projection
    gives it. The kernel path must agree with the per-chunk SDPA path and write the same cache."""
    if cpu_ops() is None:
        pytest.skip("CPU kernels unavailable")
    gen = torch.Generator().manual_seed(5)
    # (cached tokens before this step, new tokens this step)
    work = [(30, 1), (5, 1), (0, 1), (0, 16), (0, 17), (0, 70), (5, 12), (16, 33), (37, 2), (3, 1)]
    num_blocks = 64
    batcher = PagedBatcher(num_blocks=num_blocks, block_size=block_size, seed=2)
    caches = [torch.zeros(num_blocks, block_size, kv_heads, head_dim) for _ in range(2)]
    for seq, (cached, _) in enumerate(work):
        if cached:
            slots = torch.tensor(batcher._slots(seq, 0, cached), dtype=torch.long)
            for cache in caches:
                cache.view(-1, kv_heads, head_dim)[slots] = torch.randn(
                    cached, kv_heads, head_dim, generator=gen
                )
            batcher.num_cached[seq] = cached
    decodes = [(s, 0) for s, (cached, n) in enumerate(work) if n == 1 and cached > 0]
    prefills = [(s, [0] * n) for s, (cached, n) in enumerate(work) if not (n == 1 and cached > 0)]
    _, _, meta, _ = batcher.step(decodes, prefills)
    total = sum(n for _, n in work)
    q_width = heads * head_dim
    qkv = torch.randn(total, q_width + 2 * kv_heads * head_dim, generator=gen)
    q = qkv[:, :q_width].view(total, heads, head_dim)  # rows q_width + kv columns apart
    k = torch.randn(total, kv_heads, head_dim, generator=gen)
    v = torch.randn(total, kv_heads, head_dim, generator=gen)

    torch_caches = [c.clone() for c in caches]
    want = TorchPagedAttention().forward(q, k, v, *torch_caches, meta, 0.125)
    got = CpuPagedAttention().forward(q, k, v, *caches, meta, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for cache, torch_cache in zip(caches, torch_caches, strict=True):
        assert torch.equal(cache, torch_cache)


def test_cpu_prefill_kernel_rejects_bad_chunks() -> None:
    ops = cpu_ops()
    if ops is None:
        pytest.skip("CPU kernels unavailable")
    k_cache = torch.zeros(4, 16, 1, 8)
    q, out = torch.zeros(20, 1, 8), torch.zeros(20, 1, 8)
    with pytest.raises(RuntimeError, match="block id out of range"):
        ops.paged_prefill_attention(
            out, q, k_cache, k_cache, torch.tensor([[0, 20, 0]]), torch.tensor([[0, 9]]), 1.0
        )
    with pytest.raises(RuntimeError, match="chunk rows out of range"):
        ops.paged_prefill_attention(
            out, q, k_cache, k_cache, torch.tensor([[8, 16, 0]]), torch.tensor([[0, 1]]), 1.0
        )
    with pytest.raises(RuntimeError, match="longer than its block table"):
        ops.paged_prefill_attention(
            out, q, k_cache, k_cache, torch.tensor([[0, 20, 0]]), torch.tensor([[0]]), 1.0
        )


@pytest.mark.parametrize("bf16_panels", [False, True])
def test_cpu_packed_linear_matches_float64(bf16_panels: bool) -> None:
    ops = cpu_ops()
    if ops is None:
        pytest.skip("CPU kernels unavailable")
    check_packed_linear(ops, bf16_panels)


def check_packed_linear(ops: ModuleType, bf16_panels: bool) -> None:
    """The panel GEMM on shapes that hit every edge: rows across tile boundaries (1-6 row tiles,
    passes of 48 rows), columns not a multiple of the 16-column panel, several K blocks, bias.
    Shared with tests/test_kernels_isa.py, which runs it on every instruction-set tier's build."""
    gen = torch.Generator().manual_seed(3)
    for out_features, in_features in [(37, 19), (64, 576), (21, 1000)]:
        weight = torch.randn(out_features, in_features, generator=gen)
        if bf16_panels:
            weight = weight.bfloat16().float()
        bias = torch.randn(out_features, generator=gen)
        panels = ops.pack_weight_panels(weight, bf16_panels)
        for rows in (1, 5, 7, 13, 32, 49, 130):
            x = torch.randn(rows, in_features, generator=gen)
            for b in (None, bias):
                got = ops.packed_linear(x, panels, out_features, b)
                want = F.linear(x.double(), weight.double(), None if b is None else b.double())
                torch.testing.assert_close(got.double(), want, atol=1e-4 * in_features**0.5, rtol=1e-5)
    assert ops.packed_linear(
        torch.empty(0, 19), ops.pack_weight_panels(torch.ones(3, 19), False), 3
    ).shape == (0, 3)


def test_cpu_packed_linear_rejects_what_it_cannot_compute() -> None:
    ops = cpu_ops()
    if ops is None:
        pytest.skip("CPU kernels unavailable")
    with pytest.raises(RuntimeError, match="exactly a bf16"):
        ops.pack_weight_panels(torch.full((4, 8), 1.0 + 2**-12), True)
    panels = ops.pack_weight_panels(torch.ones(20, 8), False)
    with pytest.raises(RuntimeError, match="in_features"):
        ops.packed_linear(torch.ones(2, 9), panels, 20)
    with pytest.raises(RuntimeError, match="out_features"):
        ops.packed_linear(torch.ones(2, 8), panels, 40)
    with pytest.raises(RuntimeError, match="bias"):
        ops.packed_linear(torch.ones(2, 8), panels, 20, torch.ones(19))


def test_cpu_fused_elementwise_kernels_match_torch() -> None:
    ops = cpu_ops()
    if ops is None:
        pytest.skip("CPU kernels unavailable")
    check_fused_elementwise(ops)


def check_fused_elementwise(ops: ModuleType) -> None:
    """SiLU-and-multiply, fused add+RMSNorm and rotary against torch (also run per tier by
    tests/test_kernels_isa.py)."""
    gen = torch.Generator().manual_seed(2)
    for tokens, dim in [(1, 64), (7, 576), (33, 13)]:  # 13: the non-vectorised tail on its own
        gate_up = torch.randn(tokens, 2 * dim, generator=gen) * 6  # well into both tails of silu
        gate_up[0, :3] = torch.tensor([-100.0, 0.0, 100.0])
        gate, up = gate_up.split(dim, dim=-1)
        torch.testing.assert_close(ops.silu_and_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)

        x, residual = torch.randn(tokens, dim, generator=gen), torch.randn(tokens, dim, generator=gen)
        weight = torch.rand(dim, generator=gen) + 0.5
        expected_residual = x + residual
        expected = weight * (
            expected_residual * torch.rsqrt(expected_residual.pow(2).mean(-1, keepdim=True) + 1e-6)
        )
        ops.fused_add_rms_norm(x, residual, weight, 1e-6)
        torch.testing.assert_close(residual, expected_residual, atol=0, rtol=0)
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)

    # Rotary embedding on the q|k heads of a fused projection; v (the last heads) is untouched.
    # head_dim 20: a vector body of 8 plus a scalar tail of 2 per half.
    for tokens, heads, kv_heads, head_dim in [(1, 4, 2, 64), (9, 9, 3, 64), (5, 2, 1, 20)]:
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
        angles = torch.rand(tokens, 1, head_dim // 2, generator=gen) * 100
        cos, sin = angles.cos(), angles.sin()
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        want_q = apply_rope(q.reshape(tokens, heads, head_dim), cos, sin)
        want_k = apply_rope(k.reshape(tokens, kv_heads, head_dim), cos, sin)
        want_v = v.clone()
        ops.rotary_embedding(qkv, cos, sin, heads + kv_heads, head_dim)
        torch.testing.assert_close(q.reshape(tokens, heads, head_dim), want_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(k.reshape(tokens, kv_heads, head_dim), want_k, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v, want_v, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="cos and sin"):
        ops.rotary_embedding(torch.ones(2, 16), torch.ones(2, 3), torch.ones(2, 4), 2, 8)


def test_cpu_decode_kernel_rejects_bad_block_tables() -> None:
    ops = cpu_ops()
    if ops is None:
        pytest.skip("CPU kernels unavailable")
    k_cache = torch.zeros(4, 2, 1, 8)
    q, out = torch.zeros(1, 1, 8), torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="block id out of range"):
        ops.paged_decode_attention(out, q, k_cache, k_cache, torch.tensor([[7]]), torch.tensor([2]), 1.0)
    with pytest.raises(RuntimeError, match="sequence length out of range"):
        ops.paged_decode_attention(out, q, k_cache, k_cache, torch.tensor([[1]]), torch.tensor([3]), 1.0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("head_dim", "block_size", "lens"),
    [
        (64, 16, [1000]),  # one long context: split into spans that are merged
        (128, 16, [517, 33]),  # few sequences, split, one shorter than a span
        (64, 16, [1, 17, 300, 64, 5, 250, 129, 16, 2, 80]),  # many: whole sequences
        (32, 8, [203, 9]),  # a head_dim with no unrolled kernel
        (16, 4, [61]),  # rows too narrow for the 8-key tiles
    ],
)
def test_cpu_decode_attention_matches_naive(
    head_dim: int, block_size: int, lens: list[int], threads: int
) -> None:
    """The decode kernel's work split (sequences cut into spans whose partial softmaxes are
    merged when there are few, whole sequences when there are many) gives the plain softmax
    attention over each sequence's scattered cache blocks, whatever the thread count."""
    ops = cpu_ops()
    if ops is None:
        pytest.skip("CPU kernels unavailable")
    gen = torch.Generator().manual_seed(len(lens) + head_dim)
    heads, kv_heads = 9, 3
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = sum(-(-n // block_size) for n in lens) + 5
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(lens), max_blocks, dtype=torch.long)
    for s, n in enumerate(lens):
        for b in range(-(-n // block_size)):
            tables[s, b] = order.pop()
    q = torch.randn(len(lens), heads, head_dim, generator=gen) * 3  # peaked softmaxes too
    out = torch.empty_like(q)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ops.paged_decode_attention(out, q, k_cache, v_cache, tables, torch.tensor(lens), head_dim**-0.5)
    finally:
        torch.set_num_threads(saved)
    for s, n in enumerate(lens):
        rows = tables[s, : -(-n // block_size)]
        keys = k_cache[rows].reshape(-1, kv_heads, head_dim)[:n]
        values = v_cache[rows].reshape(-1, kv_heads, head_dim)[:n]
        expected = _naive_attention(q[s : s + 1], keys, values, first_pos=n - 1)
        torch.testing.assert_close(out[s : s + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [4, 16])
def test_cpu_fast_path_matches_plain_torch(
    tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, block_size: int
) -> None:
    """CPU-prepared weights (bf16 panels for the panel GEMM) and the attention kernels (prefill
    only with blocks of 16) against plain ATen matmuls and the torch backend, on decode steps of
    2-3 rows and prefill steps of more."""
    model_dir = tiny_model_dir("qwen2-bf16")
    fast = load_model(model_dir, torch.float32, "cpu", progress=False)
    monkeypatch.setenv("QUIRE_CPU_KERNELS", "0")
    plain = load_model(
        model_dir, torch.float32, "cpu", progress=False, attention_backend=TorchPagedAttention()
    )
    if fast.cpu_lm_head is None or cpu_ops() is None:
        pytest.skip("the CPU kernels are unavailable")
    assert plain.cpu_lm_head is None
    assert fast.cpu_lm_head.stores_bf16 and fast.model.layers[0].mlp.down_proj.cpu_weight.stores_bf16
    seqs = _random_seqs(fast.config.vocab_size, [9, 15, 21])
    fast_logits = _run_schedule(fast, seqs, block_size=block_size)
    plain_logits = _run_schedule(plain, seqs, block_size=block_size)
    assert fast_logits.keys() == plain_logits.keys()
    for key, logit in fast_logits.items():
        torch.testing.assert_close(logit, plain_logits[key], atol=1e-4, rtol=1e-5)


def test_fused_decode_layer_matches_layer_by_layer(
    tiny_model_dir: Callable[[str], Path], tiny_variant: str
) -> None:
    """Decode-only steps through the compiled whole-layer kernel against the same model's
    layer-by-layer path; variants the kernel does not implement (q/k norms, an o_proj bias) keep
    the layer-by-layer path."""
    model = load_model(tiny_model_dir(tiny_variant), torch.float32, "cpu", progress=False)
    if cpu_ops() is None:
        pytest.skip("the CPU kernels are unavailable")
    if tiny_variant in ("qwen3", "llama-untied-bias"):
        assert model.fused_decode_layers is None
        return
    assert model.fused_decode_layers is not None
    seqs = _random_seqs(model.config.vocab_size, [9, 15, 21])
    fused = _run_schedule(model, seqs, block_size=16)
    model.fused_decode_layers = None
    layer_by_layer = _run_schedule(model, seqs, block_size=16)
    assert fused.keys() == layer_by_layer.keys()
    for key, logit in fused.items():
        torch.testing.assert_close(logit, layer_by_layer[key], atol=1e-5, rtol=1e-5)


def test_attention_backend_registry() -> None:
    assert isinstance(get_attention_backend("torch"), TorchPagedAttention)
    assert isinstance(get_attention_backend(torch.device("cpu")), CpuPagedAttention)
    with pytest.raises(ValueError, match="unknown attention backend or device 'tpu-magic'"):
        get_attention_backend("tpu-magic")


def test_kv_cache_allocation_and_size(tiny_model_dir: Callable[[str], Path]) -> None:
    config = ModelArchConfig.from_dir(tiny_model_dir("qwen3"))
    caches = allocate_kv_caches(config, num_blocks=6, block_size=8, dtype=torch.bfloat16, device="cpu")
    assert len(caches) == config.num_hidden_layers
    k_cache, v_cache = caches[0]
    assert k_cache.shape == (6, 8, config.num_key_value_heads, 32) and k_cache.is_contiguous()
    assert not k_cache.any()
    actual = sum(t.numel() * t.element_size() for pair in caches for t in pair)
    assert kv_cache_bytes_per_block(config, 8, torch.bfloat16) * 6 == actual
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        allocate_kv_caches(config, 0, 8, torch.float32, "cpu")


def _anon_huge_kib_in(tensor: torch.Tensor) -> int:
    """AnonHugePages of this process's mappings that overlap ``tensor``'s memory (madvise splits
    the allocation's mapping at the huge-page bounds), not the whole process's total, which
    moves whenever an earlier test's huge-page tensors are freed."""
    first = tensor.data_ptr()
    last = first + tensor.untyped_storage().nbytes()
    total, overlaps = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and ":" not in head:  # a mapping's header line: start-end perms ...
            start, end = (int(bound, 16) for bound in head.split("-"))
            overlaps = start < last and first < end
        elif overlaps and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    or not Path("/proc/self/smaps").exists(),
    reason="no transparent huge pages here",
)
def test_kv_cache_asks_for_huge_pages(tiny_model_dir: Callable[[str], Path]) -> None:
    """A CPU KV pool is advised onto 2 MiB pages before it is zeroed, so decode attention's
    scattered block reads do not each miss the TLB (the usual THP setting, "madvise", gives
    huge pages only to memory that asks)."""
    config = ModelArchConfig.from_dir(tiny_model_dir("qwen3"))
    per_block = kv_cache_bytes_per_block(config, 16, torch.float32)
    caches = allocate_kv_caches(config, (64 << 20) // per_block, 16, torch.float32, "cpu")
    assert not caches[0][0].any() and not caches[-1][1].any()
    # At least 8 MiB of the 64 MiB pool on huge pages.
    assert _anon_huge_kib_in(caches[0][0]) >= 8 << 10
    assert not advise_huge_pages(torch.zeros(1024))  # smaller than one huge page: nothing to advise


# ---------------------------------------------------------------------------------------------
# demo checkpoint and tokenizer
# ---------------------------------------------------------------------------------------------


def test_demo_tokenizer_is_deterministic_and_splits_multibyte_text() -> None:
    start = time.perf_counter()
    first, second = build_tokenizer(512), build_tokenizer(512)
    assert time.perf_counter() - start < 10  # ~0.1 s each; generous bound for loaded machines
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 512
    assert [first.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", IM_END)] == [0, 1, 2]
    text = "Hello café 你好 🚀"
    ids = first.encode(text).ids
    assert first.decode(ids) == text
    # Some token alone is not valid UTF-8: incremental detokenizers must hold bytes back.
    assert any("\ufffd" in first.decode([i]) for i in ids)
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        build_tokenizer(100)


def test_demo_chat_template_is_chatml(tiny_llama_dir: Path) -> None:
    import jinja2

    config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == IM_END
    rendered = (
        jinja2.Environment()
        .from_string(CHAT_TEMPLATE)
        .render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_default_demo_checkpoint_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIRE_CACHE_DIR", str(tmp_path))
    path = default_demo_checkpoint()
    assert path.parent == tmp_path and (path / "model.safetensors").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert default_demo_checkpoint() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staging directory left behind
    config = ModelArchConfig.from_dir(path)
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim, config.vocab_size) == (
        256,
        4,
        64,
        2048,
    )
    model = _load(path)
    batcher = PagedBatcher(num_blocks=8, block_size=16)
    ids, positions, meta, _ = batcher.step([], [(0, [5, 6, 7])])
    with torch.inference_mode():
        logits = model.compute_logits(
            model(ids, positions, allocate_kv_caches(config, 8, 16, torch.float32, "cpu"), meta)
        )
    assert logits.shape == (3, 2048) and torch.isfinite(logits).all()


def test_cpu_lm_head_slices_match_one_gemm(tiny_model_dir: Callable[[str], Path], monkeypatch) -> None:
    import quire.models.llama as llama

    monkeypatch.setenv("QUIRE_CPU_KERNELS", "0")  # the sliced path is the one without packed weights
    model = load_model(tiny_model_dir("llama-untied-bias"), torch.float32, "cpu", progress=False)
    assert model.cpu_lm_head is None
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    whole = torch.nn.functional.linear(hidden, model.lm_head.weight)
    monkeypatch.setattr(llama, "_CPU_VOCAB_SLICE", 100)  # 512-token vocab: 5 full slices and a ragged one
    assert torch.equal(model.compute_logits(hidden), whole)
