"""installers/glibc_floor.py on real ELF files: libraries compiled here, put in a wheel inside a .deb built by dpkg-deb,
the way the StreamChat package ships them. installers/test.sh runs the same check on the real amd64 and arm64 .debs."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("glibc_floor", REPO / "installers" / "glibc_floor.py")
glibc_floor = sys.modules["glibc_floor"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(glibc_floor)

pytestmark = pytest.mark.skipif(not (shutil.which("cc") and shutil.which("dpkg-deb")), reason="needs cc and dpkg-deb")

# arc4random is new in glibc 2.36 (Debian 12): a library calling it cannot load on Ubuntu 22.04's 2.35.
NEW = "#include <stdlib.h>\nunsigned int draw(void) { return arc4random(); }\n"
OLD = "#include <string.h>\nvoid copy(char *a, const char *b, size_t n) { memcpy(a, b, n); }\n"


def compile_library(tmp_path: Path, name: str, source: str) -> bytes:
    c = tmp_path / f"{name}.c"
    c.write_text(source)
    out = tmp_path / f"{name}.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(c)], check=True)
    return out.read_bytes()


def build_deb(tmp_path: Path, architecture: str, files: dict[str, bytes]) -> str:
    root = tmp_path / f"root-{architecture}"
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(f"Package: floor-test\nVersion: 1\nArchitecture: {architecture}\n"
                                              "Maintainer: t <t@localhost>\nDescription: test\n")
    deb = tmp_path / f"floor-test_{architecture}.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    return str(deb)


def wheel(tmp_path: Path, members: dict[str, bytes]) -> bytes:
    path = tmp_path / "w.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path.read_bytes()


def test_a_library_inside_a_wheel_that_needs_a_newer_glibc_is_named_with_its_version_and_symbol(tmp_path, capsys):
    new, old = compile_library(tmp_path, "new", NEW), compile_library(tmp_path, "old", OLD)
    deb = build_deb(tmp_path, "amd64", {
        "opt/app/wheels/demo-1-py3-none-any.whl": wheel(tmp_path, {"demo/_new.so": new, "demo/__init__.py": b""}),
        "opt/app/lib/old.so": old,
    })
    assert glibc_floor.main([deb]) == 1
    out = capsys.readouterr().out
    assert "./opt/app/wheels/demo-1-py3-none-any.whl!demo/_new.so: needs GLIBC_2.36 (arc4random)" in out
    assert "old.so" not in out


def test_a_package_within_the_floor_passes_and_says_what_it_read(tmp_path, capsys):
    old = compile_library(tmp_path, "old", OLD)
    deb = build_deb(tmp_path, "amd64", {"opt/app/wheels/demo-1-py3-none-any.whl": wheel(tmp_path, {"demo/_old.so": old}),
                                        "opt/app/lib/old.so": old, "opt/app/readme.txt": b"not ELF"})
    assert glibc_floor.main([deb]) == 0
    out = capsys.readouterr().out
    assert "2 ELF files, 1 of them in wheels, all EM_X86_64, none above GLIBC_2.35" in out
    assert "GLIBC_2.2.5" in out or "GLIBC_2.14" in out  # memcpy's version on x86-64


def test_x86_64_code_in_an_arm64_package_is_refused(tmp_path, capsys):
    old = compile_library(tmp_path, "old", OLD)
    deb = build_deb(tmp_path, "arm64", {"opt/app/lib/kernel.so": old})
    assert glibc_floor.main([deb]) == 1
    assert "./opt/app/lib/kernel.so: built for EM_X86_64, the package is arm64" in capsys.readouterr().out


def test_the_platform_tags_pip_may_choose_wheels_for_stop_at_the_floor():
    tags = glibc_floor.platform_tags("aarch64")
    assert tags[0] == "manylinux_2_35_aarch64" and "manylinux_2_17_aarch64" in tags
    assert "manylinux_2_36_aarch64" not in tags and tags[-1] == "linux_aarch64"
    assert glibc_floor.FLOOR == (2, 35)  # Ubuntu 22.04 LTS: docs/install.md's supported systems depend on it
