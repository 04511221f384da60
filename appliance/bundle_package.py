"""Move bundles between machines: one archive out, and an install that never breaks the bundle already there.

``pack`` writes an uncompressed tar (weights do not compress) holding the bundle folder, manifest and checksums
included. ``install`` extracts into a hidden sibling, verifies every checksum, and only then points the bundle's name
at the new copy by atomically replacing a symlink; an interrupted install leaves the old bundle working.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from appliance.bundle import MANIFEST, Bundle
from appliance.errors import BundleError


def pack(bundle_dir: Path, out: Path, on_bytes: Callable[[int], None] = lambda n: None) -> Path:
    bundle = Bundle.open(bundle_dir, full_check=True)
    name = bundle.path.resolve().name
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w") as archive:
            for entry in [{"path": MANIFEST}, *bundle.files]:
                archive.add(bundle.path / entry["path"], arcname=f"{name}/{entry['path']}", recursive=False)
                on_bytes((bundle.path / entry["path"]).stat().st_size)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out


SYSTEM_MODELS = Path("/usr/share/streamchat/models")


def pack_deb(bundle_dir: Path, out: Path, version: str = "1.0") -> Path:
    """A .deb that installs the bundle into ``/usr/share/streamchat/models/<name>`` (needs dpkg-deb)."""
    import json
    import subprocess
    import tempfile

    bundle = Bundle.open(bundle_dir, full_check=True)
    name = bundle.path.resolve().name
    package = "streamchat-model-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp)
        target = root / SYSTEM_MODELS.relative_to("/") / name
        target.mkdir(parents=True)
        for entry in [{"path": MANIFEST}, *bundle.files]:
            (target / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.path / entry["path"], target / entry["path"])
        (root / "DEBIAN").mkdir()
        size_kb = sum(f["bytes"] for f in bundle.files) // 1024 + 1
        (root / "DEBIAN" / "control").write_text(
            f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: StreamChat <streamchat@localhost>\n"
            f"Installed-Size: {size_kb}\nDepends: streamchat\nSection: misc\nPriority: optional\n"
            f"Description: StreamChat model bundle {name}\n {bundle.label} ({json.dumps(bundle.manifest['quant'])})\n")
        proc = subprocess.run(["dpkg-deb", "--build", "--root-owner-group", "-Zxz", "-z1", str(root), str(out)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise BundleError(f"dpkg-deb failed: {proc.stderr.strip()}")
    return out


def _safe_members(archive: tarfile.TarFile, source: Path) -> tuple[str, list[tarfile.TarInfo]]:
    try:
        members = archive.getmembers()
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{source} is truncated or damaged ({exc}); the installed bundle was not touched") from exc
    names = {PurePosixPath(m.name).parts[0] for m in members if m.name}
    if len(names) != 1:
        raise BundleError(f"{source} is not a StreamChat bundle package (expected one top folder, found {sorted(names)})")
    for m in members:
        path = PurePosixPath(m.name)
        if path.is_absolute() or ".." in path.parts or not (m.isfile() or m.isdir()):
            raise BundleError(f"{source} holds an unsafe entry {m.name!r}; refusing to install it")
    return names.pop(), members


def install(package: Path, models_dir: Path) -> Path:
    """Install ``package`` into ``models_dir/<name>`` (a symlink to a verified, versioned folder)."""
    try:
        archive = tarfile.open(package)  # noqa: SIM115 - closed by the `with archive:` below
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{package} is not a readable bundle package ({exc}); re-copy it") from exc
    models_dir.mkdir(parents=True, exist_ok=True)
    with archive:
        name, members = _safe_members(archive, package)
        staging = models_dir / f".{name}.installing-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for m in members:
                archive.extract(m, staging, set_attrs=False)
        except (OSError, tarfile.TarError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise BundleError(f"{package} is truncated or damaged ({exc}); the installed bundle was not touched") from exc
    try:
        Bundle.open(staging / name, full_check=True)
    except BundleError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    version = models_dir / f".{name}.{time.time_ns()}"
    (staging / name).rename(version)
    staging.rmdir()
    link, previous = models_dir / name, None
    if link.is_symlink():
        previous = models_dir / os.readlink(link)
    elif link.exists():  # a plain folder from an earlier copy: move it aside first
        previous = models_dir / f".{name}.replaced-{os.getpid()}"
        link.rename(previous)
    tmp_link = models_dir / f".{name}.link-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(version.name)
    os.replace(tmp_link, link)  # the switch: atomic, so readers see the old bundle or the new one
    if previous is not None and previous.resolve() != version.resolve():
        shutil.rmtree(previous, ignore_errors=True)
    return link
