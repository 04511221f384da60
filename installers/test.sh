#!/usr/bin/env bash
# Offline install test of the .deb for ARCH (amd64 | arm64) in a clean Debian root (run as root). arm64 runs under
# qemu-user on an x86-64 machine, every step the same. About 5 minutes for amd64 and 15 for arm64 the first time.
#  1. build the wheelhouse and the .deb, and check every ELF file it ships against the glibc floor and the architecture
#     (installers/glibc_floor.py);
#  2. debootstrap a minimal Debian ($SUITE, bookworm unless set) and install the .deb's dependencies (the base image a
#     field engineer starts from; this and step 1 are the only steps that use the network);
#  3. with the network unavailable (unshare -n): install the .deb (its postinst makes the app's environment from the
#     wheels), run the headless self-test, the service and the window, make some user data, upgrade the package over
#     itself, remove it, purge it, and check the user data survived each step.
# Usage: installers/test.sh [ARCH]   (this machine's architecture unless given)
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-$(dpkg --print-architecture)}
ROOT=${STREAMCHAT_TEST_ROOT:-/var/tmp/streamchat-testroot-$arch}
SUITE=${SUITE:-bookworm}
log() { echo "[test.sh $arch $(date +%H:%M:%S)] $*"; }
fail() { log "FAILED: $*"; exit 1; }
start=$(date +%s)

installers/wheelhouse.sh "$arch"
installers/build_deb.sh "$arch"
deb=dist/streamchat_$(.venv/bin/python -c "import appliance; print(appliance.__version__)")_$arch.deb
.venv/bin/python installers/glibc_floor.py "$deb" || fail "the package needs a newer glibc than the floor"

installers/debian_root.sh "$arch" "$ROOT" "$SUITE"
trap 'umount "$ROOT/proc" 2>/dev/null || true' EXIT
log "base image: the .deb's dependencies"
depends=$(dpkg-deb -f "$deb" Depends | sed -e 's/([^)]*)//g' | tr -d ',')
# systemd: a headless server's init, and systemd-analyze for the streamchat-serve unit
chroot "$ROOT" apt-get install -y -qq --no-install-recommends adduser systemd $depends >/dev/null
chroot "$ROOT" sh -c 'dpkg -P streamchat >/dev/null 2>&1; rm -rf /root/.local/share/streamchat /root/.config/streamchat'
cp "$deb" "$ROOT/tmp/streamchat.deb"

offline() { unshare -n chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
offline sh -c 'ping -c1 -W1 deb.debian.org >/dev/null 2>&1 || getent hosts deb.debian.org >/dev/null' \
  && fail "the network is reachable inside unshare -n"
log "offline: dpkg -i (the postinst installs the wheels into /opt/streamchat/venv)"
installed=$(date +%s)
offline dpkg -i /tmp/streamchat.deb >/dev/null
venv_size=$(du -sh "$ROOT/opt/streamchat/venv" | cut -f1)
python_version=$(offline python3 --version)
log "installed in $(( $(date +%s) - installed )) s"
log "offline: self-test"
offline streamchat --self-test | tee /tmp/streamchat-selftest.txt
grep -q "^self-test ok" /tmp/streamchat-selftest.txt || fail "self-test"
kernel=$(find "$ROOT/opt/streamchat/venv" -name '_prompt_kernels*.so')
if [ "$arch" = arm64 ]; then  # x86-64 code is never built into the arm64 package; the app says so and goes on
  [ -z "$kernel" ] && grep -q "not built" /tmp/streamchat-selftest.txt \
    || fail "arm64: the kernel is in the package (${kernel:-no}) or the self-test does not say it is not built"
elif grep -qw avx2 /proc/cpuinfo; then  # the amd64 package must carry the AVX2 prompt kernel, and the app use it
  [ -n "$kernel" ] && ! grep -q "not built" /tmp/streamchat-selftest.txt || fail "the prompt kernel is missing from the package"
fi
log "offline: the headless unit is installed, disabled and valid"
[ -f "$ROOT/lib/systemd/system/streamchat-serve.service" ] || fail "streamchat-serve.service is not installed"
[ "$(offline systemctl is-enabled streamchat-serve.service || true)" = disabled ] || fail "streamchat-serve is enabled"
offline systemd-analyze verify /lib/systemd/system/streamchat-serve.service || fail "systemd-analyze verify"
log "offline: the unit's command, streamchat serve, answers HTTP and WebSocket clients on loopback"
args=$(. "$ROOT/etc/default/streamchat-serve" && echo "$STREAMCHAT_SERVE_ARGS")
# shellcheck disable=SC2086  # the options, as systemd splits them
unshare -n sh -c 'ip link set lo up && exec "$@"' sh chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root \
  LANG=C.UTF-8 streamchat serve $args --port 8765 2>/tmp/streamchat-serve.txt &
server=$!
while [ "$(readlink "/proc/$server/ns/net")" = "$(readlink /proc/self/ns/net)" ]; do sleep 0.1; done
nsenter --net="/proc/$server/ns/net" .venv/bin/python installers/serve_check.py http://127.0.0.1:8765 \
  || fail "serve: $(cat /tmp/streamchat-serve.txt)"
kill -TERM "$server"
set +e
wait "$server"
status=$?
set -e
[ "$status" = 143 ] || fail "serve exited $status on SIGTERM: $(cat /tmp/streamchat-serve.txt)"
log "offline: cold start of the window (offscreen)"
offline env QT_QPA_PLATFORM=offscreen streamchat gui --demo --ready-exit 2>/dev/null | tee /tmp/streamchat-start.txt
grep -q "window ready" /tmp/streamchat-start.txt || fail "window did not become ready"
log "offline: the window without a display says so in one line (exit 2), not Qt's abort"
set +e
offline streamchat gui --demo 2>/tmp/streamchat-nodisplay.txt
status=$?
set -e
[ "$status" = 2 ] && [ "$(wc -l < /tmp/streamchat-nodisplay.txt)" = 1 ] \
  && grep -q "^error: no display" /tmp/streamchat-nodisplay.txt \
  || fail "no display: exit $status, $(cat /tmp/streamchat-nodisplay.txt)"
log "offline: user data (a stored conversation)"
printf 'StreamChat 是什么？\n/exit\n' | offline streamchat chat --demo --greedy >/dev/null
offline streamchat history list | grep -q "StreamChat" || fail "conversation not stored"
log "offline: upgrade over itself (the same wheels: the environment is kept, not rebuilt)"
venv_inode=$(stat -c %i "$ROOT/opt/streamchat/venv")
offline dpkg -i /tmp/streamchat.deb >/dev/null
[ "$(stat -c %i "$ROOT/opt/streamchat/venv")" = "$venv_inode" ] || fail "reinstalling the same package rebuilt the environment"
if [ "$arch" = amd64 ]; then  # the swap of a changed environment: shell only, the same on every architecture
  log "offline: upgrade to changed wheels (the environment is rebuilt beside the old one and swapped in)"
  echo "an earlier release" > "$ROOT/opt/streamchat/venv/.made-of"
  offline dpkg -i /tmp/streamchat.deb >/dev/null
  [ "$(stat -c %i "$ROOT/opt/streamchat/venv")" != "$venv_inode" ] || fail "changed wheels did not rebuild the environment"
  [ ! -e "$ROOT/opt/streamchat/venv.new" ] && [ ! -e "$ROOT/opt/streamchat/venv.old" ] || fail "the rebuild left a folder"
fi
offline streamchat history list | grep -q "StreamChat" || fail "history lost on upgrade"
offline streamchat --self-test >/dev/null || fail "self-test after upgrade"
log "offline: remove, then purge"
offline dpkg -r streamchat >/dev/null
[ -f "$ROOT/root/.local/share/streamchat/history.sqlite3" ] || fail "history lost on remove"
offline dpkg -P streamchat >/dev/null
[ -f "$ROOT/root/.local/share/streamchat/history.sqlite3" ] || fail "history lost on purge"
offline getent passwd streamchat-kiosk >/dev/null && fail "purge left the kiosk account"
[ ! -e "$ROOT/opt/streamchat" ] || fail "purge left /opt/streamchat"
log "the package $(du -h "$deb" | cut -f1), the environment it made $venv_size; python3 in the root: $python_version"
log "passed in $(( $(date +%s) - start )) s"
