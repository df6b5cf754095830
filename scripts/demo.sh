#!/usr/bin/env bash
# The first five minutes: install (no vLLM needed), unpack the shipped toy world, check the adapter
# round trip, then one vanilla GRPO run of 100 steps through the real services (private Redis, reward
# worker, rollout worker, learner) -- enough to watch reward hacking emerge -- and its summary + plot.
# Extra arguments go to `rankguard up` (e.g. --arm projected --steps 200 --fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
RANKGUARD_SKIP_VLLM=${RANKGUARD_SKIP_VLLM:-1} bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
RG=.venv/bin/rankguard
echo "demo: toy world (shipped build; \`rankguard toy build --force\` rebuilds it from source)"
$RG toy build --quiet
echo "demo: adapter round trip at delta_S = 0"
$RG adapter report --preset toy --brief 2>/dev/null
echo "demo: one GRPO run through the services (vanilla arm: hacking should rise after ~40 steps)"
# every 10th step line of the learner's log (the full logs stay in runs/demo-vanilla/logs/)
$RG up --preset toy --steps 100 --run-dir runs/demo-vanilla --no-progress "$@" \
  | grep --line-buffered -vE "INFO step ([0-9]*[1-9])/[0-9]+ reward"
echo "demo: finished in $((SECONDS - t0)) s"
