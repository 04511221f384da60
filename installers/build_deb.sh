#!/usr/bin/env bash
# Package dist/streamchat (installers/build_app.sh) as a .deb: /opt/streamchat, /usr/bin/streamchat, desktop entry,
# icon and the streamchat-kiosk systemd unit. Usage: installers/build_deb.sh [VERSION] -> dist/streamchat_VERSION_ARCH.deb
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-$(.venv/bin/python -c "import appliance; print(appliance.__version__)")}
arch=$(dpkg --print-architecture)
root=build/deb-root
log() { echo "[build_deb $(date +%H:%M:%S)] $*"; }
[ -x dist/streamchat/streamchat ] || { log "dist/streamchat missing: run installers/build_app.sh first"; exit 2; }
rm -rf "$root" && mkdir -p "$root/DEBIAN" "$root/opt" "$root/usr/bin" "$root/usr/share/applications" \
  "$root/usr/share/icons/hicolor/scalable/apps" "$root/lib/systemd/system"
log "copying the frozen app"
cp -a dist/streamchat "$root/opt/streamchat"
printf '#!/bin/sh\nexec /opt/streamchat/streamchat "$@"\n' > "$root/usr/bin/streamchat"
chmod 755 "$root/usr/bin/streamchat"
cp installers/deb/streamchat.desktop "$root/usr/share/applications/"
cp installers/deb/streamchat.svg "$root/usr/share/icons/hicolor/scalable/apps/"
cp installers/deb/streamchat-kiosk.service "$root/lib/systemd/system/"
for script in postinst prerm postrm; do install -m 755 "installers/deb/$script" "$root/DEBIAN/$script"; done
size=$(du -sk "$root" | cut -f1)
# The libraries of Qt's xcb platform plugin, from the list the window's start-up check names (ui/platform_check.py).
xcb_debs=$(.venv/bin/python -c "from ui.platform_check import XCB_LIBRARIES
print(', '.join(sorted(set(XCB_LIBRARIES.values()))))")
cat > "$root/DEBIAN/control" <<CONTROL
Package: streamchat
Version: $version
Architecture: $arch
Maintainer: StreamChat developers <streamchat@localhost>
Installed-Size: $size
Depends: libc6, libegl1, libgl1, libglib2.0-0, libfontconfig1, libdbus-1-3, $xcb_debs, fonts-noto-cjk
Recommends: cage
Section: utils
Priority: optional
Description: offline chat appliance for ChatGLM-6B
 Streams answers from a local model bundle (onnxruntime on CPUs, MindSpore Lite on Ascend),
 with history, a safety filter, a kiosk mode and a built-in demo model. Never uses the network.
CONTROL
mkdir -p dist
out="dist/streamchat_${version}_${arch}.deb"
log "building $out"
dpkg-deb --build --root-owner-group -Zxz -z1 "$root" "$out" >/dev/null
log "done: $out ($(du -h "$out" | cut -f1))"
