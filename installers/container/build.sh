#!/usr/bin/env bash
# Build the service image from installers/container/Containerfile with podman, and say how long it took.
#  1. the wheelhouse: StreamChat's own wheel (with the AVX2 prompt kernel where this machine builds it), its service
#     and PostgreSQL dependencies at the versions .venv runs, made by .venv's pip (from the package index: the only
#     network use; a wheelhouse that already holds them is used offline);
#  2. the base: $STREAMCHAT_IMAGE_BASE (e.g. docker.io/library/python:3.11-slim where a registry is reachable), else the
#     local stand-in that base.sh makes from a debootstrapped Debian bookworm;
#  3. podman build --format docker (HEALTHCHECK and STOPSIGNAL are Docker-format fields; OCI images drop them).
# The wheelhouse matches this machine's architecture and .venv's Python: build where the image will run.
# Usage: installers/container/build.sh [IMAGE]   (default localhost/streamchat:VERSION); extra `podman build`
# arguments in $STREAMCHAT_BUILD_ARGS (e.g. "--build-arg VENV_FLAGS=--system-site-packages").
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(.venv/bin/python -c "import appliance; print(appliance.__version__)")
image=${1:-localhost/streamchat:$version}
base=${STREAMCHAT_IMAGE_BASE:-localhost/streamchat-base:bookworm-py311}
context=build/container
log() { echo "[container/build.sh $(date +%H:%M:%S)] $*"; }
start=$(date +%s)

[ -n "${STREAMCHAT_IMAGE_BASE:-}" ] || installers/container/base.sh "$base"

log "wheelhouse in $context/wheelhouse"
mkdir -p "$context/wheelhouse"
rm -f "$context"/wheelhouse/streamchat-*.whl
.venv/bin/python -m pip freeze --exclude-editable | grep -v ' @ ' > "$context/constraints.txt"
wheel() { .venv/bin/python -m pip wheel -qq --wheel-dir "$context/wheelhouse" --find-links "$context/wheelhouse" \
            --constraint "$context/constraints.txt" "$@" ".[service,postgres]"; }
wheel --no-index 2>/dev/null || wheel
ls "$context"/wheelhouse/streamchat-*.whl >/dev/null

log "podman build $image FROM $base"
built=$(date +%s)
# shellcheck disable=SC2086  # STREAMCHAT_BUILD_ARGS is a list of arguments
podman build --quiet --format docker --file installers/container/Containerfile --build-arg "BASE=$base" \
  ${STREAMCHAT_BUILD_ARGS:-} --tag "$image" "$context" >/dev/null
now=$(date +%s)
size=$(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')
log "built $image ($size) in $((now - built)) s; $((now - start)) s with the base and the wheelhouse"
