#!/usr/bin/env bash
# Create .venv with everything mi_spec needs (idempotent; fast when nothing changed).
# CPU machines get torch 2.13.0 (a local CPU wheel here; any other version pulls a multi-GB CUDA
# build). On a GPU machine, set MI_SPEC_TORCH="" to keep the torch your environment provides,
# or e.g. MI_SPEC_TORCH="torch==2.5.1" for a specific build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MI_SPEC_VENV:-.venv}
TORCH=${MI_SPEC_TORCH-torch==2.13.0}
stamp="$VENV/.mi_spec-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $TORCH"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
# A local wheel folder (this project's CPU machines keep torch 2.13.0 in /opt/wheels) is used when
# present, so a clean environment without pip config still gets the CPU build, not a CUDA one.
WHEELS=${MI_SPEC_WHEELS:-/opt/wheels}
links=()
if [ -d "$WHEELS" ]; then links=(--find-links "$WHEELS"); fi
pipq() { "$VENV/bin/pip" install -q "${links[@]}" "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if [ -n "$TORCH" ]; then pipq "$TORCH"; fi
pipq -e ".[dev]"
"$VENV/bin/python" -c "import mi_spec.api, torch; print('mi_spec ready, torch', torch.__version__)"
echo "$want" > "$stamp"
