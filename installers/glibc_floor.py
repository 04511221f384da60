"""The oldest glibc StreamChat's packages run on, and the check that every ELF file a .deb ships keeps to it.

The floor is Ubuntu 22.04's glibc (2.35): the most common Linux desktop, and the OS image of the Ascend 310B boards.
The dynamic loader refuses a library whose ``GLIBC_x.y`` symbol versions the system's libc lacks, so reading those
versions from every ELF file proves the package loads there. The .deb ships wheels, so ELF files inside them count too.
Every ELF file must also be built for the package's architecture (no x86-64 kernel in the arm64 package).
``installers/wheelhouse.sh`` takes the manylinux platform tags it lets pip choose wheels for from ``platform_tags``.

Usage: python installers/glibc_floor.py DEB...          (exit 1 naming each file and version above the floor)
       python installers/glibc_floor.py --platforms ARCH (the pip --platform tags of the floor, one a line)
       python installers/glibc_floor.py --floor          (the floor, e.g. 2.35: the .deb's libc6 dependency)
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection, GNUVerSymSection

FLOOR = (2, 35)
OLDEST_MANYLINUX = (2, 17)  # manylinux2014: the oldest tag the wheels this project uses are built for
ELF_MAGIC = b"\x7fELF"
MACHINES = {"amd64": "EM_X86_64", "arm64": "EM_AARCH64"}  # Debian architecture -> ELF e_machine


def platform_tags(machine: str) -> list[str]:
    """The pip ``--platform`` tags of every glibc from the floor down, newest first (``machine``: x86_64, aarch64)."""
    major, top = FLOOR
    return [f"manylinux_{major}_{minor}_{machine}" for minor in range(top, OLDEST_MANYLINUX[1] - 1, -1)] \
        + [f"linux_{machine}"]  # StreamChat's own wheel: built here, checked by this module rather than tagged


def glibc_needs(elf: ELFFile) -> dict[tuple[int, int], list[str]]:
    """The ``GLIBC_x.y`` versions an ELF file needs, each with the dynamic symbols bound to it (a version needed by
    no symbol, as linkers record for the library as a whole, maps to an empty list)."""
    needs: dict[int, tuple[int, int]] = {}
    result: dict[tuple[int, int], list[str]] = {}
    verneed = next((s for s in elf.iter_sections() if isinstance(s, GNUVerNeedSection)), None)
    if verneed is None:
        return result
    for _library, auxiliaries in verneed.iter_versions():
        for aux in auxiliaries:
            version = _glibc_version(aux.name)
            if version is not None:
                needs[aux.entry["vna_other"]] = version
                result.setdefault(version, [])
    versym = next((s for s in elf.iter_sections() if isinstance(s, GNUVerSymSection)), None)
    dynsym = elf.get_section_by_name(".dynsym")
    if versym is not None and dynsym is not None:
        for index, symbol in enumerate(dynsym.iter_symbols()):
            version = needs.get(versym.get_symbol(index).entry["ndx"])
            if version is not None and symbol.name:
                result[version].append(symbol.name)
    return result


def _glibc_version(name: str) -> tuple[int, int] | None:
    if not name.startswith("GLIBC_") or not name[6:].replace(".", "").isdigit():
        return None  # GLIBC_PRIVATE and other libraries' versions (GLIBCXX_, GCC_, ...)
    parts = [int(p) for p in name[6:].split(".")]
    return parts[0], parts[1] if len(parts) > 1 else 0


@dataclass(frozen=True)
class ElfFile:
    path: str  # inside the package; "a.whl!b.so" for a file inside a wheel
    machine: str  # e_machine: EM_X86_64, EM_AARCH64, ...
    needs: dict[tuple[int, int], list[str]]

    @classmethod
    def read(cls, path: str, data: bytes) -> ElfFile:
        elf = ELFFile(io.BytesIO(data))
        return cls(path, elf["e_machine"], glibc_needs(elf))

    @property
    def highest(self) -> tuple[int, int]:
        return max(self.needs, default=(0, 0))


def package_elf_files(deb: str) -> Iterator[ElfFile]:
    """Every ELF file the .deb installs, and every ELF file inside the wheels it installs."""
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()
            if data.startswith(ELF_MAGIC):
                yield ElfFile.read(member.name, data)
            elif member.name.endswith(".whl"):
                with zipfile.ZipFile(io.BytesIO(data)) as wheel:
                    for name in wheel.namelist():
                        with wheel.open(name) as f:
                            if f.read(4) != ELF_MAGIC:
                                continue
                        yield ElfFile.read(f"{member.name}!{name}", wheel.read(name))


def problems(files: list[ElfFile], architecture: str, floor: tuple[int, int] = FLOOR) -> list[str]:
    """One line per file built for another architecture, and per version above the floor: the file, the version and
    the symbols that need it."""
    lines = [f"{f.path}: built for {f.machine}, the package is {architecture}"
             for f in files if f.machine != MACHINES.get(architecture)]
    for f in files:
        for version in sorted(v for v in f.needs if v > floor):
            symbols = ", ".join(sorted(f.needs[version])[:5]) or "no symbol: the library as a whole"
            lines.append(f"{f.path}: needs GLIBC_{version[0]}.{version[1]} ({symbols})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("debs", nargs="*", help=".deb files to check")
    parser.add_argument("--platforms", metavar="ARCH", help="print the pip --platform tags of the floor for ARCH")
    parser.add_argument("--floor", action="store_true", help="print the floor")
    args = parser.parse_args(argv)
    if args.floor:
        print(f"{FLOOR[0]}.{FLOOR[1]}")
        return 0
    if args.platforms:
        print("\n".join(platform_tags(args.platforms)))
        return 0
    status = 0
    for deb in args.debs:
        architecture = subprocess.run(["dpkg-deb", "-f", deb, "Architecture"], check=True, capture_output=True,
                                      text=True).stdout.strip()
        files = list(package_elf_files(deb))
        bad = problems(files, architecture)
        top = max(files, key=lambda f: f.highest, default=None)
        floor = f"GLIBC_{FLOOR[0]}.{FLOOR[1]}"
        if bad:
            print(f"{deb}: {len(bad)} problem(s) with the floor {floor} and architecture {architecture}:\n  "
                  + "\n  ".join(bad))
            status = 1
        elif top is not None:
            print(f"{deb}: {len(files)} ELF files, {sum('!' in f.path for f in files)} of them in wheels, all "
                  f"{MACHINES[architecture]}, none above {floor}; the highest is "
                  f"GLIBC_{top.highest[0]}.{top.highest[1]} ({top.path})")
        else:
            print(f"{deb}: no ELF files")
    return status


if __name__ == "__main__":
    sys.exit(main())
