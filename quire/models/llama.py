"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a flat token batch and a paged KV cache.

The variants differ only in flags resolved by ``ModelArchConfig`` (projection biases, Qwen3's
per-head q/k RMSNorm, RoPE scaling, tied embeddings), so there is one code path. Tokens of all
sequences in a step are concatenated (no batch dimension); the attention backend is the only part
that knows which token belongs to which sequence.

q/k/v and gate/up projections are fused into one matmul each (fewer, larger GEMMs are markedly
faster on CPU); ``checkpoint_layout`` tells the loader where each Hugging Face tensor lands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from quire.kernels.cpu_ops import cpu_ops
from quire.models.cpu_linear import CpuLinearWeight, cpu_fast_linear_available
from quire.models.hf_config import ModelArchConfig, RopeScaling
from quire.models.loader import WeightSlot
from quire.models.registry import register_model
from quire.worker.attention import (
    AttentionBackend,
    CpuPagedAttention,
    get_attention_backend,
    kernels_take_kv_cache,
)
from quire.worker.attention_metadata import AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]
# Tensors some checkpoints carry that hold nothing the model needs (RoPE frequencies are recomputed).
_IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)
# On CPU the LM head runs in vocabulary slices of this many rows: a [tokens, 2048] output tile
# stays in cache, and the whole product measured 1.2-1.5x faster than one [tokens, vocab] GEMM
# (smollm2-135m shapes, 1-128 tokens, bit-identical results). GPUs keep the single GEMM.
# Only used where CPU-prepared weights (quire.models.cpu_linear) are not.
_CPU_VOCAB_SLICE = 2048


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised on purpose: every parameter is overwritten by the loader, and random init of a
    # multi-GB model would cost seconds for nothing.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class LinearMethod(Protocol):
    """How a loaded weight is multiplied: called like ``F.linear(x, weight, bias)``.

    Implementations: CPU-prepared dense panels (``quire.models.cpu_linear.CpuLinearWeight``),
    weights kept in GGUF block formats (``quire.models.quant_linear.QuantizedLinearWeight``)."""

    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class FusedDecodeSource(Protocol):
    """A linear method the compiled whole-layer decode kernel can multiply by: it hands over its
    weight as a ``LinearOperand`` (``quire/kernels/csrc/linear_operand.h``), or None where it
    cannot (then the model runs decode steps layer by layer)."""

    def fused_decode_operand(self) -> object | None: ...


class VocabMethod(LinearMethod, Protocol):
    """A linear method that can also serve token-embedding lookups (rows of the matrix)."""

    def embedding(self, ids: torch.Tensor) -> torch.Tensor: ...


def _release(param: nn.Parameter) -> None:
    # Keep the Parameter object (named_parameters and checkpoint_layout still list it) but free
    # its storage: the weight method holds the only copy from now on.
    param.data = param.data.new_empty(0)


def _check_method_shape(owner: str, method: LinearMethod, out_features: int, in_features: int) -> None:
    if (method.out_features, method.in_features) != (out_features, in_features):
        raise ValueError(
            f"{owner}: weight method {type(method).__name__} is [{method.out_features}, "
            f"{method.in_features}], expected [{out_features}, {in_features}]"
        )


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with a checkpoint shard map: ``shards`` names the Hugging Face
    projections fused into this one, in row order, with their row counts.

    The product goes through ``method`` once one is set (``set_weight_method``): the dense
    ``weight`` is then released, and the bias stays a plain parameter."""

    def __init__(
        self,
        in_features: int,
        shards: dict[str, int],
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.shards = shards
        self.in_features = in_features
        self.out_features = sum(shards.values())
        self.weight = _empty(self.out_features, in_features, dtype=dtype, device=device)
        self.bias = _empty(self.out_features, dtype=dtype, device=device) if bias else None
        self.method: LinearMethod | None = None

    @property
    def cpu_weight(self) -> CpuLinearWeight | None:
        """The CPU-prepared dense weight, where that is this layer's method."""
        return self.method if isinstance(self.method, CpuLinearWeight) else None

    def set_weight_method(self, method: LinearMethod) -> None:
        """Multiply through ``method`` from now on and release the dense weight's memory."""
        _check_method_shape(type(self).__name__, method, self.out_features, self.in_features)
        self.method = method
        _release(self.weight)

    def prepare_for_cpu(self) -> None:
        """Switch to CPU-prepared weights, unless a method (e.g. a quantized one) is already set."""
        if self.method is None:
            self.set_weight_method(CpuLinearWeight(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method is None:
            return F.linear(x, self.weight, self.bias)
        return self.method(x, self.bias)


class VocabMatrix(nn.Module):
    """A ``[vocab, hidden]`` matrix: the token embedding, or an untied output projection.

    With a method set (a quantized matrix), lookups and products both go through it and the
    dense ``weight`` is released, so a tied LM head shares the embedding's quantized blocks."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.weight = _empty(vocab_size, hidden_size, dtype=dtype, device=device)
        self.method: VocabMethod | None = None

    def set_weight_method(self, method: VocabMethod) -> None:
        _check_method_shape(type(self).__name__, method, self.vocab_size, self.hidden_size)
        self.method = method
        _release(self.weight)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows for token ids ``[T] -> [T, hidden]``."""
        if self.method is None:
            return F.embedding(ids, self.weight)
        return self.method.embedding(ids).to(self.weight.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, optionally fused with the residual add that precedes it."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _empty(dim, dtype=dtype, device=device)
        # The compiled CPU kernels, set by LlamaForCausalLM.prepare_for_inference where they apply.
        self.cpu_ops: ModuleType | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before scaling, as the reference implementation does, so bf16 rounds alike.
        return self.weight * xf.to(x.dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm(x + residual)`` and the new residual ``x + residual``.

        The compiled kernel works in place: both inputs are this layer's own intermediates."""
        if self.cpu_ops is not None and x.is_contiguous() and residual.is_contiguous() and x.dim() == 2:
            self.cpu_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        residual = x + residual
        return self.forward(residual), residual


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Per-pair rotation frequencies in fp32, bit-for-bit as transformers computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    assert scaling.rope_type == "llama3", scaling.rope_type  # hf_config rejects anything else
    return _llama3_scale(inv_freq, scaling)


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths are slowed by ``factor``, short ones kept, and the band
    in between interpolated smoothly in ``original_len / wavelength``."""
    assert s.low_freq_factor is not None and s.high_freq_factor is not None
    assert s.original_max_position_embeddings is not None
    original_len = s.original_max_position_embeddings
    low_freq_wavelen = original_len / s.low_freq_factor
    high_freq_wavelen = original_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables ``[max_positions, head_dim / 2]`` indexed by token position."""

    def __init__(self, config: ModelArchConfig, max_positions: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.max_positions = max_positions
        self._build(self.inv_freq, dtype, device)

    def _build(self, inv_freq: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        # fp32 position * inv_freq, then cast: the same rounding as the reference per position.
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_cache", freqs.cos().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin_cache", freqs.sin().to(device=device, dtype=dtype), persistent=False)

    def divide_frequencies(self, factors: torch.Tensor) -> None:
        """Divide each pair's frequency by ``factors`` (``[head_dim / 2]``): how GGUF files store
        Llama 3.1-style scaling (llama.cpp's ``rope_freqs`` tensor) instead of its parameters."""
        if factors.shape != self.inv_freq.shape or not bool((factors > 0).all()):
            raise ValueError(
                f"RoPE frequency factors must be {list(self.inv_freq.shape)} positive numbers, "
                f"got shape {list(factors.shape)}"
            )
        self.inv_freq = self.inv_freq / factors.to(torch.float32)
        self._build(self.inv_freq, self.cos_cache.dtype, self.cos_cache.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [T, 1, D/2]: broadcast over heads.
        return self.cos_cache[positions].unsqueeze(1), self.sin_cache[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, D]`` in the "rotate half" layout (pairs are ``i`` and ``i + D/2``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(
        self,
        config: ModelArchConfig,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.backend = backend
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size,
            {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows},
            config.qkv_bias,
            dtype,
            device,
        )
        self.o_proj = Linear(q_rows, {"o_proj": config.hidden_size}, config.o_proj_bias, dtype, device)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, device)
        self.cpu_ops: ModuleType | None = None  # see RMSNorm.cpu_ops

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        # The compiled kernel rotates q and k in place inside the fused projection output; models
        # with q/k norms (Qwen3) normalise first, into new tensors, and keep the torch rotation.
        fused_rope = self.cpu_ops is not None and self.q_norm is None and qkv.is_contiguous()
        if fused_rope:
            self.cpu_ops.rotary_embedding(qkv, cos, sin, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([q_rows, kv_rows, kv_rows], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if not fused_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, q_rows))


class MLP(nn.Module):
    def __init__(self, config: ModelArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.intermediate_size = inter
        self.gate_up_proj = Linear(
            config.hidden_size, {"gate_proj": inter, "up_proj": inter}, config.mlp_bias, dtype, device
        )
        self.down_proj = Linear(inter, {"down_proj": config.hidden_size}, config.mlp_bias, dtype, device)
        self.cpu_ops: ModuleType | None = None  # see RMSNorm.cpu_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.cpu_ops is not None and gate_up.is_contiguous():
            return self.down_proj(self.cpu_ops.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelArchConfig,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Attention(config, backend, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = MLP(config, dtype, device)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is deferred into the next norm: returns (mlp output, residual stream).
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(x, cos, sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(x), residual


class DecoderStack(nn.Module):
    """Embeddings, layers and final norm; named like the checkpoint's ``model.`` prefix."""

    def __init__(
        self,
        config: ModelArchConfig,
        backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabMatrix(config.vocab_size, config.hidden_size, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, backend, dtype, device) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)


@register_model("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
class LlamaForCausalLM(nn.Module):
    """Causal LM over a flat batch of tokens. Build it with ``quire.models.loader.load_model``.

    Parameters are left uninitialised here; the loader fills every one from the checkpoint.
    ``max_positions`` bounds the RoPE table (default: the config's ``max_position_embeddings``);
    positions at or past it are out of range.
    """

    def __init__(
        self,
        config: ModelArchConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attention_backend: AttentionBackend | None = None,
        max_positions: int | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.config = config
        self.dtype = dtype
        backend = attention_backend or get_attention_backend(device)
        self.model = DecoderStack(config, backend, dtype, device)
        self.rotary = RotaryEmbedding(config, max_positions or config.max_position_embeddings, dtype, device)
        self.lm_head: VocabMatrix | None = None
        if not config.tie_word_embeddings:
            self.lm_head = VocabMatrix(config.vocab_size, config.hidden_size, dtype, device)
        # The LM head's product: CPU-prepared panels, or the output matrix's own (quantized) method.
        self.cpu_lm_head: LinearMethod | None = None
        # Per layer, the weights of the compiled whole-layer decode kernel (the extension's
        # DecodeLayerWeights); None where it does not apply (see _fused_decode_layers).
        self.fused_decode_layers: list[object] | None = None

    def prepare_for_inference(self) -> None:
        """Called once the weights are loaded: on CPU in fp32, every dense matmul moves to
        CPU-prepared weights (``quire.models.cpu_linear``; off with ``QUIRE_CPU_KERNELS=0``).
        Linears that already have a method (quantized) keep it; a quantized output matrix is
        the LM head as it is."""
        output = self._output_matrix()
        if output.method is not None:
            self.cpu_lm_head = output.method
        # The norm weight is never released, so it tells the compute dtype and device.
        if not cpu_fast_linear_available(self.model.norm.weight):
            return
        ops = cpu_ops()
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepare_for_cpu()
            elif isinstance(module, (RMSNorm, MLP, Attention)):
                module.cpu_ops = ops
        # A dense embedding keeps its matrix for lookups; the LM head gets prepared copies.
        if self.cpu_lm_head is None:
            self.cpu_lm_head = CpuLinearWeight(output.weight)
        self.fused_decode_layers = self._fused_decode_layers(ops)

    def quantize_linears(self, quantize: Callable[[torch.Tensor], LinearMethod]) -> None:
        """Replace every decoder Linear's dense weight by ``quantize(weight)`` (e.g. int8 or int4
        blocks). The vocabulary matrices have their own hook (``quantize_vocab_matrices``)."""
        for module in self.model.layers.modules():
            if isinstance(module, Linear) and module.method is None:
                module.set_weight_method(quantize(module.weight.data.float()))

    def quantize_vocab_matrices(self, quantize: Callable[[torch.Tensor], VocabMethod]) -> None:
        """Replace the token embedding's dense matrix (and an untied LM head's) by
        ``quantize(weight)``: lookups dequantize the rows they read, and a tied LM head multiplies
        by the embedding's blocks, as with a GGUF file's quantized ``token_embd``."""
        for matrix in (self.model.embed_tokens, self.lm_head):
            if matrix is not None and matrix.method is None:
                matrix.set_weight_method(quantize(matrix.weight.data.float()))

    def _fused_decode_layers(self, ops: ModuleType | None) -> list[object] | None:
        """Each layer's ``DecodeLayerWeights`` for ``decode_layer`` (one compiled call per layer on
        decode-only steps), or None unless every layer has the plain shape that kernel implements:
        no bias but an optional q|k|v one (Qwen2), no q/k norms, the CPU attention backend, and
        linear methods that hand the kernel an operand (dense panels or GGUF blocks; see
        ``FusedDecodeSource``)."""
        if ops is None or not hasattr(ops, "DecodeLayerWeights"):
            return None
        plan = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if (
                attn.q_norm is not None
                or not isinstance(attn.backend, CpuPagedAttention)
                or any(lin.bias is not None for lin in linears[1:])
            ):
                return None
            operands = [
                lin.method.fused_decode_operand() if isinstance(lin.method, FusedDecodeSource) else None
                for lin in linears
            ]
            if any(operand is None for operand in operands):
                return None
            weights = ops.DecodeLayerWeights(
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight, operands,
                attn.qkv_proj.bias, attn.num_heads, layer.input_layernorm.eps, attn.scale,
            )  # fmt: skip
            plan.append(weights)
        return plan

    def _output_matrix(self) -> VocabMatrix:
        return self.model.embed_tokens if self.lm_head is None else self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, absolute position of each token in its sequence
        kv_caches: list[KVCache],  # per layer (k_cache, v_cache)
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states ``[T, hidden]`` for every input token."""
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(f"need one KV cache per layer ({len(self.model.layers)}), got {len(kv_caches)}")
        x = self.model.embed_tokens.lookup(input_ids)
        cos, sin = self.rotary(positions)
        if self.fused_decode_layers is not None and self._is_fused_decode_step(attn_metadata, kv_caches):
            return self._fused_decode_forward(x, cos, sin, kv_caches, attn_metadata)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, kv_cache, attn_metadata)
        assert residual is not None  # the config parser requires at least one layer
        x, _ = self.model.norm.add_forward(x, residual)
        return x

    def _is_fused_decode_step(self, meta: AttentionMetadata, kv_caches: list[KVCache]) -> bool:
        # decode_layer takes the caches the attention kernels take (fp32, and bf16 from
        # --kv-cache-dtype); its q/out stay fp32, which fused_decode_layers already requires.
        return (
            not meta.prefills
            and meta.num_decodes > 0
            and kernels_take_kv_cache(kv_caches[0][0].dtype)
            and kv_caches[0][0].device.type == "cpu"
        )

    def _fused_decode_forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """``forward`` for a step of single-token decodes only: one compiled call per layer."""
        assert self.fused_decode_layers is not None
        ops = cpu_ops()
        # A zero residual makes layer 0's "add + norm" the plain norm of the embeddings.
        residual = torch.zeros_like(x)
        for weights, (k_cache, v_cache) in zip(self.fused_decode_layers, kv_caches, strict=True):
            x = ops.decode_layer(
                weights, x, residual, cos, sin, k_cache, v_cache, meta.slot_mapping,
                meta.decode_block_tables, meta.decode_seq_lens,
            )  # fmt: skip
        x, _ = self.model.norm.add_forward(x, residual)
        return x

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[S, hidden] -> [S, vocab]`` float32 logits (call it on the rows you sample from)."""
        head = self.cpu_lm_head if self.cpu_lm_head is not None else self._output_matrix().method
        if head is not None:
            return head(hidden_states).float()
        weight = self._output_matrix().weight
        vocab = weight.shape[0]
        if hidden_states.device.type != "cpu" or vocab <= _CPU_VOCAB_SLICE:
            return F.linear(hidden_states, weight).float()
        logits = torch.empty(hidden_states.shape[0], vocab, dtype=torch.float32, device=hidden_states.device)
        for start in range(0, vocab, _CPU_VOCAB_SLICE):
            part = weight[start : start + _CPU_VOCAB_SLICE]
            logits[:, start : start + part.shape[0]] = F.linear(hidden_states, part)
        return logits

    def checkpoint_layout(self) -> dict[str, WeightSlot]:
        """Hugging Face tensor name -> where it lands in this model's parameters."""
        layout: dict[str, WeightSlot] = {}
        for module_name, module in self.named_modules():
            if isinstance(module, Linear):
                layout.update(_linear_layout(module_name, module))
        covered = {slot.param for slot in layout.values()}
        for name, param in self.named_parameters():
            if name not in covered:
                layout[name] = WeightSlot(name, 0, tuple(param.shape))
        return layout

    def ignored_checkpoint_weights(self, name: str) -> bool:
        """Whether a checkpoint tensor is known to be redundant for this model."""
        if name.endswith(_IGNORED_WEIGHT_SUFFIXES):
            return True
        # Tied checkpoints sometimes store the duplicate anyway; the embedding is what counts.
        return self.lm_head is None and name == "lm_head.weight"


def _linear_layout(module_name: str, module: Linear) -> dict[str, WeightSlot]:
    """One entry per fused shard: ``model.layers.0.self_attn.k_proj.weight`` -> rows of qkv_proj."""
    parent = module_name.rpartition(".")[0]
    layout: dict[str, WeightSlot] = {}
    start = 0
    for shard, rows in module.shards.items():
        prefix = f"{parent}.{shard}"
        layout[f"{prefix}.weight"] = WeightSlot(f"{module_name}.weight", start, (rows, module.in_features))
        if module.bias is not None:
            layout[f"{prefix}.bias"] = WeightSlot(f"{module_name}.bias", start, (rows,))
        start += rows
    return layout
