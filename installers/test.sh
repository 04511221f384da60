#!/usr/bin/env bash
# Offline install test of the .deb in a clean Debian root (run as root; about 10 minutes the first time).
#  1. build the frozen app and the .deb;
#  2. debootstrap a minimal Debian and install the .deb's dependencies (the base image a field engineer starts from;
#     this is the only step that uses the network);
#  3. with the network unavailable (unshare -n): install the .deb, run the headless self-test, make some user data,
#     upgrade the package over itself, remove it, purge it, and check the user data survived each step.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${STREAMCHAT_TEST_ROOT:-/var/tmp/streamchat-testroot}
SUITE=${SUITE:-bookworm}
log() { echo "[test.sh $(date +%H:%M:%S)] $*"; }
fail() { log "FAILED: $*"; exit 1; }

installers/build_app.sh
installers/build_deb.sh
deb=$(ls -t dist/streamchat_*.deb | head -n 1)

if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
  command -v debootstrap >/dev/null || { log "installing debootstrap"; apt-get update -qq >/dev/null; apt-get install -y -qq debootstrap >/dev/null; }
  log "debootstrap $SUITE (minbase) into $ROOT"
  debootstrap --variant=minbase "$SUITE" "$ROOT" >/dev/null
fi
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
trap 'umount "$ROOT/proc" 2>/dev/null || true' EXIT
log "base image: the .deb's dependencies"
depends=$(dpkg-deb -f "$deb" Depends | tr -d ',')
chroot "$ROOT" apt-get install -y -qq --no-install-recommends adduser $depends >/dev/null
chroot "$ROOT" sh -c 'dpkg -P streamchat >/dev/null 2>&1; rm -rf /root/.local/share/streamchat /root/.config/streamchat'
cp "$deb" "$ROOT/tmp/streamchat.deb"

offline() { unshare -n chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
offline sh -c 'ping -c1 -W1 deb.debian.org >/dev/null 2>&1 || getent hosts deb.debian.org >/dev/null' \
  && fail "the network is reachable inside unshare -n"
log "offline: dpkg -i"
offline dpkg -i /tmp/streamchat.deb >/dev/null
log "offline: self-test"
offline streamchat --self-test | tee /tmp/streamchat-selftest.txt
grep -q "^self-test ok" /tmp/streamchat-selftest.txt || fail "self-test"
if grep -qw avx2 /proc/cpuinfo && [ "$(uname -m)" = x86_64 ]; then  # the package must carry the AVX2 prompt kernel
  grep -q "prompt kernel loaded" /tmp/streamchat-selftest.txt || fail "the prompt kernel is missing from the package"
fi
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
log "offline: upgrade over itself"
offline dpkg -i /tmp/streamchat.deb >/dev/null
offline streamchat history list | grep -q "StreamChat" || fail "history lost on upgrade"
offline streamchat --self-test >/dev/null || fail "self-test after upgrade"
log "offline: remove, then purge"
offline dpkg -r streamchat >/dev/null
[ -f "$ROOT/root/.local/share/streamchat/history.sqlite3" ] || fail "history lost on remove"
offline dpkg -P streamchat >/dev/null
[ -f "$ROOT/root/.local/share/streamchat/history.sqlite3" ] || fail "history lost on purge"
offline getent passwd streamchat-kiosk >/dev/null && fail "purge left the kiosk account"
[ ! -e "$ROOT/opt/streamchat" ] || fail "purge left /opt/streamchat"
log "artifact sizes:"
du -sh dist/streamchat "$deb" | sed 's/^/    /'
log "passed"
