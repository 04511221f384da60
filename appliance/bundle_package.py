"""Move bundles between machines: one archive out, and an install that never breaks the bundle already there.

``pack`` writes an uncompressed tar (weights do not compress) holding the bundle folder, manifest, digest and checksums
included. ``install`` accepts only what ``pack`` writes: one top folder named like a bundle, regular files and folders,
exactly the files its manifest lists at their listed sizes (checked before anything is written, so it writes no more
than the manifest declares). It extracts into a hidden sibling, verifies every checksum, and only then points the
bundle's name at the new copy by atomically replacing a symlink; an interrupted install leaves the old bundle working.
Only version folders that install created (``.<name>.<ns>`` inside the models folder) are ever removed. Installed files
are not executable, except an Ascend bundle's ``convert.sh`` (which must be byte for byte the one StreamChat writes).

``--out`` of ``pack`` may name a new file or an existing regular file, which is replaced whole; anything else there (a
folder, a FIFO, a device, a symlink: not followed, so a link to a file is refused too) is refused.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from appliance.bundle import DIGEST, HASH_CHUNK, MANIFEST, MAX_MANIFEST_BYTES, Bundle, is_safe_path, read_manifest
from appliance.conversion import CONVERT_SCRIPT
from appliance.errors import BundleError
from appliance.folders import why_not_writable
from appliance.targets import STATIC, TARGETS

# a package's top folder: the bundle's name, which install also uses in its hidden version folders
PACKAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def pack(bundle_dir: Path, out: Path, on_bytes: Callable[[int], None] = lambda n: None) -> Path:
    _check_out(out)
    bundle = Bundle.open(bundle_dir, full_check=True)
    name = _package_name(bundle.path)
    tmp, fd = out.with_name(f".{out.name}.{os.getpid()}-{time.time_ns()}.partial"), None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # a new file of ours: never through a link
        with open(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w", dereference=True) as archive:
            for rel in bundle.paths:
                archive.add(bundle.path / rel, arcname=f"{name}/{rel}", recursive=False)
                on_bytes((bundle.path / rel).stat().st_size)
        os.replace(tmp, out)
    except BaseException as exc:
        if fd is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise BundleError(f"cannot write {out}: {exc.strerror or exc}") from exc
        raise
    return out


def _check_out(out: Path) -> None:
    """Refuse, before packing, an ``--out`` that ``why_not_writable`` refuses."""
    if (problem := why_not_writable(out)) is not None:
        raise BundleError(problem)


def _package_name(path: Path) -> str:
    """The bundle's folder name as the user sees it (an installed bundle's link name, not its version folder)."""
    name = Path(os.path.abspath(path)).name
    if not PACKAGE_NAME.fullmatch(name):
        raise BundleError(f"bundle folder name {name!r} cannot name a package (letters, digits, _ . -, not starting with "
                          "a dot): rename the folder")
    return name


SYSTEM_MODELS = Path("/usr/share/streamchat/models")


def pack_deb(bundle_dir: Path, out: Path, version: str = "1.0") -> Path:
    """A .deb that installs the bundle into ``/usr/share/streamchat/models/<name>`` (needs dpkg-deb)."""
    import json
    import subprocess

    _check_out(out)
    bundle = Bundle.open(bundle_dir, full_check=True)
    name = _package_name(bundle.path)
    package = "streamchat-model-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp)
        target = root / SYSTEM_MODELS.relative_to("/") / name
        target.mkdir(parents=True)
        for rel in bundle.paths:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.path / rel, target / rel)
        (root / "DEBIAN").mkdir()
        size_kb = sum(f["bytes"] for f in bundle.files) // 1024 + 1
        (root / "DEBIAN" / "control").write_text(
            f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: StreamChat <streamchat@localhost>\n"
            f"Installed-Size: {size_kb}\nDepends: streamchat\nSection: misc\nPriority: optional\n"
            f"Description: StreamChat model bundle {name}\n {bundle.label} ({json.dumps(bundle.manifest['quant'])})\n")
        built = Path(tmp) / "package.deb"  # beside the package root, not inside it; renamed over --out when whole
        proc = subprocess.run(["dpkg-deb", "--build", "--root-owner-group", "-Zxz", "-z1", str(root), str(built)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise BundleError(f"dpkg-deb failed: {proc.stderr.strip()}")
        os.replace(built, out)
    return out


def _members(archive: tarfile.TarFile, source: Path) -> tuple[str, list[tarfile.TarInfo], dict]:
    """The package's bundle name, members and manifest, once its manifest (digest checked) lists exactly its files at their
    sizes; anything ``pack`` does not write is refused before a byte is extracted."""
    try:
        members = archive.getmembers()
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{source} is truncated or damaged ({exc}); the installed bundle was not touched") from exc
    for m in members:
        regular = m.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not m.issparse()
        if not is_safe_path(m.name) or not (regular or m.isdir()):
            raise BundleError(f"{source} holds an unsafe entry {m.name!r} (only plain files and folders with plain "
                              "relative names are installed); refusing to install it")
    if len({m.name for m in members}) != len(members):
        raise BundleError(f"{source} holds an entry twice; it was not written by `streamchat bundle pack`")
    tops = {m.name.split("/")[0] for m in members}
    files = {m.name.split("/", 1)[1]: m for m in members if m.isfile() and "/" in m.name}
    if len(tops) != 1 or len(files) != sum(m.isfile() for m in members):
        raise BundleError(f"{source} is not a StreamChat bundle package (expected one top folder, found "
                          f"{sorted(tops)[:5]})")
    name = tops.pop()
    if not PACKAGE_NAME.fullmatch(name):
        raise BundleError(f"{source}: top folder {name!r} is not a bundle name (letters, digits, _ . -, not starting "
                          "with a dot); refusing to install it")
    digest = _small_member(archive, files[DIGEST], source) if DIGEST in files else None
    manifest = read_manifest(_small_member(archive, files.get(MANIFEST), source), digest, f"{source}:{name}")
    listed = {entry["path"]: entry["bytes"] for entry in manifest["files"]}
    for rel, m in files.items():
        if rel in (MANIFEST, DIGEST):
            continue
        if rel not in listed:
            raise BundleError(f"{source} holds {rel}, which its manifest does not list; refusing to install it")
        if m.size != listed[rel]:
            raise BundleError(f"{source}: {rel} is {m.size} bytes in the package but its manifest says {listed[rel]}; "
                              "re-pack the bundle")
    missing = sorted(set(listed) - set(files))
    if missing:
        raise BundleError(f"{source} lacks {', '.join(missing[:3])} listed in its manifest (truncated?): re-copy it")
    return name, members, manifest


def _small_member(archive: tarfile.TarFile, member: tarfile.TarInfo | None, source: Path) -> bytes:
    if member is None:
        raise BundleError(f"{source} has no {MANIFEST}: it is not a StreamChat bundle package")
    if member.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{source}: {member.name} is over {MAX_MANIFEST_BYTES} bytes; refusing to install it")
    try:
        with archive.extractfile(member) as fh:
            return fh.read()
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{source} is truncated or damaged ({exc}); the installed bundle was not touched") from exc


def _extract(archive: tarfile.TarFile, members: list[tarfile.TarInfo], staging: Path,
             on_bytes: Callable[[int], None]) -> None:
    """Write the checked members as new plain files and folders (no links, owners, modes or times from the archive:
    files are created rw-r--r--, so none is executable); ``on_bytes`` hears each chunk written."""
    for m in members:
        dest = staging / m.name
        if m.isdir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        with archive.extractfile(m) as src, open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as out:
            while chunk := src.read(HASH_CHUNK):
                out.write(chunk)
                on_bytes(len(chunk))


def _previous_version(link: Path, name: str) -> Path | None:
    """The version folder ``link`` points at if install created it (``.<name>.<ns>`` right inside the models folder);
    a link the user made to a bundle elsewhere is replaced, but what it points at is left alone."""
    if not link.is_symlink() or not re.fullmatch(rf"\.{re.escape(name)}\.[0-9]+", os.readlink(link)):
        return None
    folder = link.parent / os.readlink(link)
    return folder if folder.is_dir() and not folder.is_symlink() else None


def _open_package(package: Path) -> BinaryIO:
    """``package`` open for reading if it is a regular file. Opened without blocking and checked on the open descriptor:
    reading a FIFO would wait for a writer forever, a device would never end."""
    try:
        fd = os.open(package, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise BundleError(f"{package} is not a readable bundle package ({exc.strerror or exc}); re-copy it") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{package} is not a regular file (a folder, pipe or device); give the file `streamchat bundle "
                          "pack` wrote")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def install(package: Path, models_dir: Path, on_bytes: Callable[[int], None] = lambda n: None) -> Path:
    """Install ``package`` into ``models_dir/<name>`` (a symlink to a verified, versioned folder). ``on_bytes`` hears
    each chunk extracted, then each chunk verified (a progress bar over twice the bundle's bytes); an exception it
    raises cancels the install, which then removes what it wrote and leaves the installed bundle as it was."""
    with _open_package(package) as fh:
        return _install(fh, package, models_dir, on_bytes)


def _install(fh: BinaryIO, package: Path, models_dir: Path, on_bytes: Callable[[int], None]) -> Path:
    try:
        archive = tarfile.open(fileobj=fh, mode="r:")  # noqa: SIM115 - closed by the `with archive:` below
    except tarfile.ReadError as exc:
        raise BundleError(f"{package} is not an uncompressed tar made by `streamchat bundle pack` (compressed packages "
                          "are refused): re-pack the bundle") from exc
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{package} is not a readable bundle package ({exc}); re-copy it") from exc
    with archive:
        name, members, manifest = _members(archive, package)
        link = models_dir / name
        if link.exists() and not link.is_symlink():
            raise BundleError(f"{link} is not a bundle installed by `streamchat bundle install`; move it away or choose "
                              "another --into (nothing was changed)")
        try:
            models_dir.mkdir(parents=True, exist_ok=True)
            need, free = sum(m.size for m in members), shutil.disk_usage(models_dir).free
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.installing-", dir=models_dir))
        except OSError as exc:
            raise BundleError(f"cannot write into {models_dir}: {exc.strerror or exc}") from exc
        if need > free:
            staging.rmdir()
            raise BundleError(f"not enough disk space in {models_dir}: the bundle needs {need / 1e9:.2f} GB, "
                              f"{free / 1e9:.2f} GB are free")
        version, moved = models_dir / f".{name}.{time.time_ns()}", False
        try:
            _extract(archive, members, staging, on_bytes)
            script = staging / name / CONVERT_SCRIPT
            if TARGETS[manifest["target"]].graphs == STATIC and script.is_file():
                script.chmod(0o755)  # removed with the rest unless the byte-for-byte check below passes
            (staging / name).rename(version)
            moved = True
            Bundle.open(version, full_check=True, on_bytes=on_bytes)  # verified where it stays, so later opens know
            # these files passed; ``on_bytes`` hears the hashing too (a cancel while a large bundle is checked)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if moved:
                shutil.rmtree(version, ignore_errors=True)
            if isinstance(exc, tarfile.TarError):
                raise BundleError(f"{package} is truncated or damaged ({exc}); the installed bundle was not touched") from exc
            if isinstance(exc, OSError):
                raise BundleError(f"cannot write into {models_dir}: {exc.strerror or exc}; the installed bundle was not "
                                  "touched") from exc
            raise
    staging.rmdir()
    previous = _previous_version(link, name)
    tmp_link = models_dir / f".{name}.link-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(version.name)
    os.replace(tmp_link, link)  # the switch: atomic, so readers see the old bundle or the new one
    if previous is not None and previous != version:
        shutil.rmtree(previous, ignore_errors=True)
    return link
