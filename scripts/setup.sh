#!/usr/bin/env bash
# Installs everything llamagrid needs into ./.venv (idempotent). Used by both README commands.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch first (pinned): an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==${LLAMAGRID_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e '.[server,dev]'
