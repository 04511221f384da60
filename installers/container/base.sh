#!/usr/bin/env bash
# Make the local stand-in for python:3.11-slim when no image registry is reachable: a debootstrapped Debian bookworm
# (minbase) with Debian's Python 3.11 and venv, imported into podman as localhost/streamchat-base:bookworm-py311.
# Only Debian's mirror is used. Does nothing when the image exists (STREAMCHAT_BASE_REBUILD=1 makes it again).
# Run as root (debootstrap). Usage: installers/container/base.sh [IMAGE]
set -euo pipefail
image=${1:-localhost/streamchat-base:bookworm-py311}
root=${STREAMCHAT_BASE_ROOT:-/var/tmp/streamchat-container-base}
log() { echo "[container/base.sh $(date +%H:%M:%S)] $*"; }
if [ "${STREAMCHAT_BASE_REBUILD:-0}" != 1 ] && podman image exists "$image"; then
  log "$image exists"
  exit 0
fi
rm -rf "$root"
log "debootstrap bookworm (minbase + python3, python3-venv) into $root"
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" >/dev/null
# What python:3.11-slim leaves out too: package lists, caches, documentation.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
log "importing as $image"
tar -C "$root" --numeric-owner -c . | podman import --quiet --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$image" >/dev/null
rm -rf "$root"
log "done: $image ($(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
