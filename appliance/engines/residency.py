"""Give back the RAM of weight pages onnxruntime has read once and keeps only mapped.

onnxruntime memory-maps a bundle's external weights. Prepacking reads every matrix once; a table it keeps besides its
packed copy (the quantized lm_head that the embedding's Gather shares) then stays resident, although a step touches
only the embedding rows it picks: 0.55 GB of RSS for ChatGLM-6B's INT8 table. Unmodified pages of a private file
mapping can be dropped with MADV_DONTNEED at no risk: the kernel reads them from the file again on the next touch.
Linux only; elsewhere nothing is released.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

MADV_DONTNEED = 4


def file_mappings(path: Path) -> list[tuple[int, int, int, int]]:
    """(start, end, resident bytes, bytes written by this process) of its mappings of ``path``.

    Pages this process wrote to a private mapping are copies ("Anonymous" in smaps), the only ones dropping would lose.
    """
    target, found, current = str(Path(path).resolve()), [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
                current = None
                if len(fields) >= 6 and " ".join(fields[5:]) == target:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    current = [start, end, 0, 0]
                    found.append(current)
            elif current is not None and fields[0] in ("Rss:", "Anonymous:"):
                current[2 if fields[0] == "Rss:" else 3] = int(fields[1]) * 1024
    return [tuple(m) for m in found]


def release_clean_pages(path: Path) -> int:
    """Drop the resident pages of ``path``'s mappings that this process never wrote to; returns the bytes released."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, end, resident, written in file_mappings(path):
        if resident and not written and libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            released += resident
    return released
