#!/usr/bin/env bash
# Main job on the embedded default: install, build the toy world, check the adapter round trip,
# then run one vanilla GRPO run through the real services (Redis, reward, rollout, learner).
# Extra arguments go to `rankguard up` (e.g. --arm projected --steps 100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
RG=.venv/bin/rankguard
$RG toy build
$RG adapter report --preset toy
exec $RG up --preset toy "$@"
