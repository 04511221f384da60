#!/usr/bin/env bash
# A minimal Debian root for ARCH (amd64 | arm64) at DIR, made by debootstrap when DIR has none, with /proc mounted
# (onnxruntime refuses a model's external weights without it). arm64 on an x86-64 machine runs under qemu-user: the
# script installs qemu-user-static and binfmt-support from Debian when they are missing and mounts binfmt_misc.
# Used by installers/wheelhouse.sh (arm64: StreamChat's own wheel is built in this root) and installers/test.sh.
# Run as root. Usage: installers/debian_root.sh ARCH DIR [SUITE]   (SUITE: bookworm unless given)
set -euo pipefail
arch=$1 dir=$2 suite=${3:-bookworm}
log() { echo "[debian_root $(date +%H:%M:%S)] $*"; }
need() { dpkg -s "$@" >/dev/null 2>&1 || { log "installing $*"; apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }; }
need debootstrap
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
  need qemu-user-static binfmt-support
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable >/dev/null 2>&1 || true
fi
if [ ! -x "$dir/usr/bin/apt-get" ]; then
  start=$(date +%s)
  log "debootstrap --arch=$arch $suite (minbase) into $dir"
  rm -rf "$dir"
  debootstrap --arch="$arch" --variant=minbase "$suite" "$dir" >/dev/null
  log "debootstrap took $(( $(date +%s) - start )) s"
fi
mountpoint -q "$dir/proc" || mount -t proc proc "$dir/proc"
