#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with kd-cache and what running it needs.
#   ./scripts/setup.sh           what running needs (the README's first command)
#   ./scripts/setup.sh --test    that, plus the test tools: pytest, moto, ruff, triton (the README's second command)
# torch: an installed torch (any >= 2.4, e.g. your CUDA build) is kept. Otherwise torch 2.13.0 is installed from
# PyPI, which on Linux x86_64 is the CUDA build (several GB); KD_CACHE_TORCH=cpu picks the CPU-only build instead
# (about 200 MB, from PyTorch's CPU index): the one switch for a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    *) echo "usage: [KD_CACHE_TORCH=cpu] $0 [--test]" >&2; exit 2 ;;
  esac
done
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  case "${KD_CACHE_TORCH:-}" in
    cpu) python -m pip install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu ;;
    "") python -m pip install -q "torch==2.13.0" ;;
    *) echo "KD_CACHE_TORCH=${KD_CACHE_TORCH}: set it to cpu for the CPU-only build, or leave it unset" >&2; exit 2 ;;
  esac
fi
python -m pip install -q -e ".${extras}"
# Prefect's database (under PREFECT_HOME, ~/.prefect by default) migrated once, here, instead of on the first
# `kd-cache run`, where it made the temporary server's first start 25 s instead of 13 s on a busy machine.
prefect server database upgrade -y > /dev/null
