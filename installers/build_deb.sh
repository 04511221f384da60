#!/usr/bin/env bash
# Package the wheelhouse (installers/wheelhouse.sh ARCH) as a .deb: the wheels in /opt/streamchat/wheels, which the
# postinst installs into /opt/streamchat/venv with the system's own python3 (3.10 to 3.13), /usr/bin/streamchat,
# desktop entry, icons, the streamchat-kiosk unit and the headless streamchat-serve unit (disabled).
# Usage: installers/build_deb.sh ARCH [VERSION] -> dist/streamchat_VERSION_ARCH.deb   (ARCH: amd64 | arm64)
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:?usage: installers/build_deb.sh amd64|arm64 [VERSION]}
version=${2:-$(.venv/bin/python -c "import appliance; print(appliance.__version__)")}
wheelhouse=build/wheelhouse-$arch
root=build/deb-root
log() { echo "[build_deb $(date +%H:%M:%S)] $*"; }
ls "$wheelhouse"/streamchat-"$version"-*.whl >/dev/null 2>&1 \
  || { log "$wheelhouse has no StreamChat $version wheel: run installers/wheelhouse.sh $arch first"; exit 2; }
rm -rf "$root" && mkdir -p "$root/DEBIAN" "$root/opt/streamchat" "$root/usr/bin" "$root/usr/share/applications" \
  "$root/usr/share/icons/hicolor/scalable/apps" \
  "$root/usr/share/icons/hicolor/"{48x48,128x128,256x256}/apps "$root/lib/systemd/system"
log "copying the wheelhouse"
cp -a "$wheelhouse" "$root/opt/streamchat/wheels"
install -m 755 installers/deb/streamchat "$root/usr/bin/streamchat"
cp installers/deb/streamchat.desktop "$root/usr/share/applications/"
cp ui/assets/streamchat.svg "$root/usr/share/icons/hicolor/scalable/apps/"  # the window's icon, one source
for size in 48 128 256; do
  cp "ui/assets/streamchat-$size.png" "$root/usr/share/icons/hicolor/${size}x$size/apps/streamchat.png"
done
cp installers/deb/streamchat-kiosk.service "$root/lib/systemd/system/"
# The headless service: its unit (installed disabled) and its options, a conffile that upgrades keep.
cp installers/deb/streamchat-serve.service "$root/lib/systemd/system/"
install -D -m 644 installers/deb/streamchat-serve.default "$root/etc/default/streamchat-serve"
echo /etc/default/streamchat-serve > "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do install -m 755 "installers/deb/$script" "$root/DEBIAN/$script"; done
size=$(du -sk "$root" | cut -f1)
# The libraries of Qt's xcb platform plugin, from the list the window's start-up check names (ui/platform_check.py).
xcb_debs=$(.venv/bin/python -c "from ui.platform_check import XCB_LIBRARIES
print(', '.join(sorted(set(XCB_LIBRARIES.values()))))")
# The glibc floor and the Pythons the wheelhouse has wheels for (cp310.txt ... cp313.txt), as dependencies.
glibc=$(.venv/bin/python installers/glibc_floor.py --floor)
minors=$(ls "$wheelhouse"/cp3*.txt | sed 's/.*cp3\([0-9]*\)\.txt/\1/' | sort -n)
python="python3 (>= 3.$(head -n1 <<< "$minors")~), python3 (<< 3.$(( $(tail -n1 <<< "$minors") + 1 ))~)"
cat > "$root/DEBIAN/control" <<CONTROL
Package: streamchat
Version: $version
Architecture: $arch
Maintainer: StreamChat developers <streamchat@localhost>
Installed-Size: $size
Depends: libc6 (>= $glibc), $python, python3-venv, libegl1, libgl1, libglib2.0-0, libfontconfig1, libdbus-1-3, $xcb_debs, fonts-noto-cjk
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
# gzip -1: the wheels are compressed already (xz saves 1% of 300 MB and takes two minutes)
dpkg-deb --build --root-owner-group -Zgzip -z1 "$root" "$out" >/dev/null
log "done: $out ($(du -h "$out" | cut -f1))"
