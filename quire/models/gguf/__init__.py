"""GGUF files (llama.cpp's single-file format) as a quire weight format.

``read_gguf_arch_config`` turns a file's metadata into the same ``ModelArchConfig`` a Hugging Face
``config.json`` gives; ``load_gguf_weights`` fills a built model from the file's tensors, keeping
quantized linears in their GGUF block bytes (``quire.models.quant_linear``) and copying F32, F16
and BF16 tensors into the dense fp32 parameters. ``quire.models.loader`` routes ``.gguf`` paths here.
"""

from __future__ import annotations

from quire.gguf_file import is_gguf_file
from quire.models.gguf.metadata import read_gguf_arch_config
from quire.models.gguf.weights import load_gguf_weights

__all__ = ["is_gguf_file", "load_gguf_weights", "read_gguf_arch_config"]
