#!/usr/bin/env bash
# Create .venv beside the checkout and install StreamChat with its test and export extras (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
echo "bootstrap: installing streamchat[dev] (numpy, sentencepiece, onnx, onnxruntime, pytest, ...)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
echo "bootstrap: ready (.venv/bin/streamchat)"
