"""Text from files, bundles or a model made safe to print: no control characters, no hidden reordering, no unbounded
quotes.

Stored titles, imported messages, file names in error messages and model output are data. Printed raw, an escape
sequence in them could move the cursor, rewrite earlier lines or retitle the terminal; a carriage return could hide
what precedes it; a bidirectional override could make ``\\u202egnp.exe`` read as ``exe.png``. Values quoted in error
messages come from untrusted files too: ``quoted`` bounds them. Standard library only (the crash path uses it).
"""

from __future__ import annotations

import reprlib

_KEPT = {"\n", "\t"}
# Invisible characters that reorder or disguise the text around them (Unicode bidi controls, UAX #9): the embeddings
# and overrides LRE RLE PDF LRO RLO, the isolates LRI RLI FSI PDI, and the marks LRM RLM ALM. Other format characters
# (zero-width joiners, soft hyphens) are kept: scripts and emoji need them and they cannot reorder anything.
_BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]
_HIDDEN = {code: "\ufffd" for code in [*range(0x20), *range(0x7F, 0xA0), *_BIDI] if chr(code) not in _KEPT}


def printable(text: str) -> str:
    """``text`` with every C0/C1 control character but newline and tab, and every bidi control, shown as U+FFFD."""
    return text.translate(_HIDDEN)


def one_line(text: str) -> str:
    """``text`` on one line: runs of whitespace (newlines included) become one space, control characters U+FFFD."""
    return printable(" ".join(text.split()))


class _Bounded(reprlib.Repr):
    """``reprlib`` that also bounds integers without converting them: ``repr`` of an integer over 4300 digits raises
    ValueError (and converting one of a million digits would take seconds)."""

    def repr_int(self, x: int, level: int) -> str:
        bits = x.bit_length()
        return f"{'-' if x < 0 else ''}<{bits}-bit integer>" if bits > 128 else repr(x)


_BOUNDED = _Bounded()
_BOUNDED.maxlevel, _BOUNDED.maxlist, _BOUNDED.maxtuple, _BOUNDED.maxdict = 3, 10, 10, 4
_BOUNDED.maxstring, _BOUNDED.maxother = 50, 50


def quoted(value: object, limit: int = 60) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters, for any value an untrusted file can produce:
    nesting is cut at three levels, long strings, containers and integers are shortened, and a ``repr`` that fails
    shows the type. Control characters are escaped by ``repr`` itself."""
    text = _BOUNDED.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
