"""Text from files, bundles or a model made safe to print: no control characters.

Stored titles, imported messages, file names in error messages and model output are data. Printed raw, an escape
sequence in them could move the cursor, rewrite earlier lines or retitle the terminal; a carriage return could hide
what precedes it. Standard library only (the crash path uses it).
"""

from __future__ import annotations

_KEPT = {"\n", "\t"}
_CONTROL = {code: "\ufffd" for code in [*range(0x20), *range(0x7F, 0xA0)] if chr(code) not in _KEPT}


def printable(text: str) -> str:
    """``text`` with every C0/C1 control character but newline and tab shown as U+FFFD."""
    return text.translate(_CONTROL)


def one_line(text: str) -> str:
    """``text`` on one line: runs of whitespace (newlines included) become one space, control characters U+FFFD."""
    return printable(" ".join(text.split()))
