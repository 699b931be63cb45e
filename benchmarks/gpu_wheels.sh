#!/bin/sh
# Bring megatron-core (cp312 wheel, ~2.6 MB) for the GPU check machine, which has Python 3.12 and
# torch but cannot install from a registry. Run once here, in the repository root; .wheels/ is
# git-ignored and travels with the device command through `carry: [".wheels"]` (docs/gpu-check.md).
set -e
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .wheels megatron-core==0.16.1
ls -l .wheels
git check-ignore -q .wheels/ && echo ".wheels/ is git-ignored"
