#!/usr/bin/env bash
# Build wheelhouse/ for tools/gpu_check.sh on a machine that reaches PyPI: the project's
# dependencies besides torch (which the GPU machines have), as wheels, without their own deps
# where the GPU image already has them. Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p wheelhouse
pip wheel -q --no-deps -w wheelhouse deepspeed hjson ninja py-cpuinfo msgpack pydantic pydantic-core \
  annotated-types typing-inspection webdataset braceexpand lpips hydra-core omegaconf antlr4-python3-runtime \
  pytest pytest-timeout iniconfig pluggy fsspec
du -sh wheelhouse
