#!/usr/bin/env bash
# Create .venv beside the checkout and install StreamChat with its test and export extras (idempotent).
# The install is skipped when nothing it depends on changed since the last one: .venv/.bootstrap-stamp holds the hash
# of pyproject.toml, setup.py, the C kernel's source, the venv's Python and the extras. BOOTSTRAP_FORCE=1 installs
# anyway. STREAMCHAT_EXTRAS (default dev) names the extras, e.g. dev,mindspore for the MindSpore engine's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${STREAMCHAT_EXTRAS:-dev}
[[ "$EXTRAS" =~ ^[a-z,]+$ ]] || { echo "bootstrap: STREAMCHAT_EXTRAS must be extra names separated by commas"; exit 2; }
STAMP=.venv/.bootstrap-stamp
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=$({ cat pyproject.toml setup.py appliance/kernels/prompt_kernels.c; .venv/bin/python -VV; echo "$EXTRAS"; } | sha256sum)
if [ "${BOOTSTRAP_FORCE:-0}" != 1 ] && [ -x .venv/bin/streamchat ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$stamp" ]; then
  echo "bootstrap: ready, nothing changed since the last install (.venv/bin/streamchat; BOOTSTRAP_FORCE=1 reinstalls)"
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
echo "bootstrap: installing streamchat[$EXTRAS] (numpy, sentencepiece, onnx, onnxruntime, pytest, ...)"
rm -f "$STAMP"  # written again only after a complete install
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
echo "$stamp" > "$STAMP"
echo "bootstrap: ready (.venv/bin/streamchat)"
