#!/usr/bin/env bash
# The .deb's wheelhouse for ARCH (amd64 | arm64) in build/wheelhouse-ARCH: StreamChat's own wheel and, for each CPython
# the package supports (3.10 Ubuntu 22.04, 3.11 Debian 12, 3.12 Ubuntu 24.04, 3.13 Debian 13), the wheels of its
# dependencies with the app, service and PostgreSQL extras, and cpXY.txt: exactly what the package's postinst installs
# on that Python (name==version, the whole closure). Only manylinux wheels whose tag is at or below the glibc floor
# (installers/glibc_floor.py) are allowed, so pip chooses what a glibc-2.35 system can load; pip also refuses at
# install time any wheel the system cannot run. The only network use is here: pip's downloads from the package index.
#  - amd64: StreamChat's wheel is built by .venv's pip, with the AVX2 prompt kernel (stable ABI: one build for 3.10+).
#  - arm64: the wheel is built in an arm64 Debian root under qemu-user (installers/debian_root.sh), where setup.py sees
#    aarch64 and compiles nothing: the wheel is pure Python. The other wheels are aarch64 downloads.
# Usage: installers/wheelhouse.sh ARCH   (the arm64 root: $STREAMCHAT_ARM64_ROOT, /var/tmp/streamchat-testroot-arm64)
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:?usage: installers/wheelhouse.sh amd64|arm64}
case "$arch" in amd64) machine=x86_64 ;; arm64) machine=aarch64 ;; *) echo "unknown architecture $arch" >&2; exit 2 ;; esac
PYTHONS="3.10 3.11 3.12 3.13"
EXTRAS=ui,service,postgres
out=build/wheelhouse-$arch
log() { echo "[wheelhouse $arch $(date +%H:%M:%S)] $*"; }
start=$(date +%s)
version=$(.venv/bin/python -c "import appliance; print(appliance.__version__)")
rm -rf "$out" build/wheel-src-$arch && mkdir -p "$out" build/wheel-src-$arch

# The source as the work tree has it, without build products (compiled kernels, caches): files git tracks or would.
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C build/wheel-src-$arch
if [ "$arch" = amd64 ]; then
  log "StreamChat's wheel (with the AVX2 prompt kernel)"
  .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -w "$out" build/wheel-src-$arch
else
  root=${STREAMCHAT_ARM64_ROOT:-/var/tmp/streamchat-testroot-arm64}
  installers/debian_root.sh arm64 "$root"
  log "StreamChat's wheel, built in $root under qemu-user"
  cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/pip-ca.crt"  # the index's certificate for pip in the root
  rm -rf "$root/tmp/wheel-build" && mkdir -p "$root/tmp/wheel-build" && cp -a build/wheel-src-$arch "$root/tmp/wheel-build/src"
  chroot "$root" sh -c 'dpkg -s python3-venv >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv; } >/dev/null'
  chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 PIP_CERT=/tmp/pip-ca.crt \
    SSL_CERT_FILE=/tmp/pip-ca.crt REQUESTS_CA_BUNDLE=/tmp/pip-ca.crt sh -ec 'cd /tmp/wheel-build && python3 -m venv venv
    venv/bin/pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps -w out ./src'
  cp "$root"/tmp/wheel-build/out/streamchat-*.whl "$out/"
  rm -rf "$root/tmp/wheel-build" "$root/tmp/pip-ca.crt"
fi
wheel=$(ls "$out"/streamchat-"$version"-*.whl)
log "built $(basename "$wheel")"

platforms=()
for tag in $(.venv/bin/python installers/glibc_floor.py --platforms "$machine"); do platforms+=(--platform "$tag"); done
for python in $PYTHONS; do
  lock="$out/cp${python/./}.txt"
  common=(--disable-pip-version-check --only-binary=:all: --implementation cp --python-version "$python" "${platforms[@]}")
  # Resolve for this Python and the floor's platforms (metadata only), then download exactly what was chosen.
  .venv/bin/python -m pip install -q "${common[@]}" --dry-run --ignore-installed --target build/wheel-none-$arch \
    --report "$out/report.json" "streamchat[$EXTRAS] @ file://$PWD/$wheel"
  .venv/bin/python - "$out/report.json" "$lock" "$EXTRAS" <<'PY'
import json, sys
report, lock, extras = sys.argv[1:]
items = [i["metadata"] for i in json.load(open(report))["install"]]
with open(lock, "w") as f:
    for m in sorted(items, key=lambda m: m["name"].lower()):
        extra = f"[{extras}]" if m["name"] == "streamchat" else ""
        f.write(f"{m['name']}{extra}=={m['version']}\n")
PY
  grep -v '^streamchat\[' "$lock" > "$out/download.txt"
  .venv/bin/python -m pip download -q "${common[@]}" --no-deps -d "$out" -r "$out/download.txt"
  log "Python $python: $(wc -l < "$lock") packages ($(grep -iE '^(onnxruntime|numpy|pyside6[-_]essentials)=' "$lock" | tr '\n' ' '))"
done
rm -f "$out/report.json" "$out/download.txt"
rm -rf build/wheel-none-$arch build/wheel-src-$arch
log "done: $out, $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1), in $(( $(date +%s) - start )) s"
