#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with kd-cache and its test tools.
# torch is pinned to a CPU build here for CPU machines; on a GPU machine install your CUDA torch first
# (any torch>=2.4 satisfies pyproject.toml) and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
