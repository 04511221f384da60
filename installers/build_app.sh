#!/usr/bin/env bash
# Build the frozen one-folder app (PyInstaller) into dist/streamchat: app, core, onnxruntime, PySide6 Essentials and
# the demo model: the portable build (a folder on a USB stick, with portable.txt beside it: appliance/folders.py).
# It carries the build machine's own libraries, so it runs on that machine's glibc and newer (2.36 when built on
# Debian 12). The field package is the .deb (installers/wheelhouse.sh, installers/build_deb.sh): glibc 2.35 and newer.
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
  --add-data "$PWD/ui/assets:ui/assets" \
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
