#!/usr/bin/env bash
# Build the frozen one-folder app (PyInstaller) into dist/streamchat: app, core, onnxruntime, PySide6 Essentials and
# the demo model. x86_64 here; for aarch64 (Ascend 310B boards) run the same script on the board (see docs/install.md).
# MindSpore and MindSpore Lite stay out: on an Ascend machine they come with its CANN image (docs/ascend.md).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[build_app $(date +%H:%M:%S)] $*"; }
log "installing PyInstaller into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check "pyinstaller>=6"
log "freezing (this takes a few minutes)"
.venv/bin/pyinstaller --noconfirm --clean --log-level WARN --onedir --name streamchat \
  --distpath dist --workpath build/pyinstaller --specpath build --paths "$PWD" \
  --add-data "$PWD/appliance/demo/checkpoint:appliance/demo/checkpoint" \
  --add-data "$PWD/appliance/safety_lists:appliance/safety_lists" \
  --add-data "$PWD/appliance/engines/lite_server.py:appliance/engines" \
  --collect-submodules appliance --collect-submodules model_export --collect-submodules streamchat \
  --collect-submodules ui --collect-binaries onnxruntime --collect-data onnx \
  --exclude-module torch --exclude-module matplotlib --exclude-module hypothesis --exclude-module pytest \
  --exclude-module safetensors --exclude-module tkinter \
  --exclude-module mindspore --exclude-module mindspore_lite --exclude-module scipy \
  installers/streamchat_app.py
log "smoke test of the frozen app"
QT_QPA_PLATFORM=offscreen dist/streamchat/streamchat --help >/dev/null
log "done: dist/streamchat ($(du -sh dist/streamchat | cut -f1))"
