#!/usr/bin/env bash
# Create .venv with everything mi_spec needs (idempotent; fast when nothing changed).
# CPU machines get torch 2.13.0 (a local CPU wheel here; any other version pulls a multi-GB CUDA
# build). On a GPU machine, set MI_SPEC_TORCH="" to keep the torch your environment provides,
# or e.g. MI_SPEC_TORCH="torch==2.5.1" for a specific build. MI_SPEC_PYTHON picks the
# interpreter (default python3, >= 3.11). Runs on Linux and stock macOS (bash 3.2, no sha256sum).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MI_SPEC_VENV:-.venv}
TORCH=${MI_SPEC_TORCH-torch==2.13.0}
PYTHON=${MI_SPEC_PYTHON:-python3}
digest() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }
stamp="$VENV/.mi_spec-installed"
want="$(digest < pyproject.toml | cut -c1-16) $TORCH"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "mi_spec needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1) (set MI_SPEC_PYTHON)" >&2
  exit 1
fi
if [ -z "$TORCH" ]; then  # keep the torch of $PYTHON's environment: the venv sees its packages
  if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "MI_SPEC_TORCH is empty (keep the existing torch) but $PYTHON has no torch:" \
      "install torch there first, or set MI_SPEC_TORCH=torch==<version>" >&2
    exit 1
  fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
else
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
# A local wheel folder (this project's CPU machines keep torch 2.13.0 in /opt/wheels) is used when
# present, so a clean environment without pip config still gets the CPU build, not a CUDA one.
WHEELS=${MI_SPEC_WHEELS:-/opt/wheels}
links=()
if [ -d "$WHEELS" ]; then links=(--find-links "$WHEELS"); fi
pipq() {  # ${links[@]+...}: an empty array is "unbound" under set -u in bash 3.2
  "$VENV/bin/pip" install -q ${links[@]+"${links[@]}"} "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
if [ -n "$TORCH" ]; then pipq "$TORCH"; fi
pipq -e ".[dev]"
"$VENV/bin/python" -c "import mi_spec.api, torch; print('mi_spec ready, torch', torch.__version__)"
echo "$want" > "$stamp"
