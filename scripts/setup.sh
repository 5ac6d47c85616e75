#!/usr/bin/env bash
# Creates .venv and installs portrait3d with everything it needs on a fresh Debian
# machine (CPU). Idempotent: a second run only checks. Used by `make demo`/`make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${P3D_VENV:-.venv}
EXTRAS=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.p3d-installed"
want="$(cat pyproject.toml setup.py | sha256sum | cut -c1-16)$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date" >&2
else
  # torch first and pinned: an unpinned torch would pull several GB of CUDA wheels on a
  # CPU machine; on a GPU machine set P3D_TORCH to the CUDA build you want.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing ${P3D_TORCH:-torch==2.13.0}" >&2
    $PIP install -q ${P3D_TORCH:-torch==2.13.0}
  fi
  echo "[setup] installing portrait3d${EXTRAS:+[$EXTRAS]}" >&2
  $PIP install -q -e ".${EXTRAS:+[$EXTRAS]}"
  echo "$want" > "$stamp"
fi

# The Khronos glTF validator (npm) for the GLB checks; node ships with the machine.
if [ "${P3D_SKIP_VALIDATOR:-0}" != "1" ] && [ -f tools/install_validator.sh ]; then
  bash tools/install_validator.sh >&2 || echo "[setup] warning: glTF validator not installed (node/npm missing?)" >&2
fi
