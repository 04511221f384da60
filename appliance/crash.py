"""Turn any failure into the one line a user sees; keep the full story of unexpected ones in a crash log.

A ``StreamChatError`` already says what to do. Running out of memory says how much there was. Anything else is a bug:
its traceback goes to ``<cache>/crashes/`` and the line names that file, so nothing is lost and the console never shows
a raw traceback. Standard library only: this must work when numpy or onnxruntime could not even be imported.
"""

from __future__ import annotations

import datetime
import os
import resource
import sys
import traceback
from pathlib import Path

from appliance import display
from appliance.errors import StreamChatError
from appliance.folders import cache_dir

# The demo model answers in a 260 MB address space on a 2-core machine (numpy's OpenBLAS reserves a buffer per core);
# below this, numpy's import aborts the process from C before Python can report anything.
MIN_ADDRESS_SPACE = 256 << 20
_MAPPING_FAILURE = "failed to map segment"


def address_space_limit() -> int | None:
    """The process's ``ulimit -v`` in bytes, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def check_address_space() -> None:
    """Refuse to start under an address-space limit too small to import the runtime (see MIN_ADDRESS_SPACE)."""
    limit = address_space_limit()
    if limit is not None and limit < MIN_ADDRESS_SPACE:
        raise StreamChatError(f"not enough memory: StreamChat needs at least {MIN_ADDRESS_SPACE >> 20} MB of address "
                              f"space to start, this process is limited to {limit >> 20} MB (ulimit -v)")


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (isinstance(exc, ImportError) and _MAPPING_FAILURE in str(exc))


def expected(exc: BaseException) -> bool:
    """A failure the user can act on (bad input, not enough memory), as opposed to a bug in StreamChat."""
    return isinstance(exc, StreamChatError) or _out_of_memory(exc)


def write_crash_log(exc: BaseException, context: str) -> Path | None:
    """Write the traceback of ``exc`` to a new file under ``<cache>/crashes``; None when even that is impossible."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"StreamChat crash while {context}\n{datetime.datetime.now().isoformat()}\nargv: {sys.argv}\n"
            f"python {sys.version}\n\n" + "".join(traceback.format_exception(exc)))
    try:
        folder = cache_dir() / "crashes"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"crash-{stamp}-{os.getpid()}.txt"
        path.write_text(text, encoding="utf-8")
        return path
    except Exception:  # the one line still names the failure, without the path
        return None


def one_line(exc: BaseException, context: str) -> str:
    """What to show for ``exc`` (raised while ``context``, e.g. "answering"): always one line."""
    if isinstance(exc, StreamChatError):
        return display.one_line(str(exc))
    if _out_of_memory(exc):
        limit = address_space_limit()
        have = f"this process is limited to {limit >> 20} MB (ulimit -v)" if limit else "the machine ran out"
        return f"not enough memory while {context}: {have}; close other programs or raise the limit"
    path = write_crash_log(exc, context)
    where = f"the details are in {path}" if path else "no crash log could be written"
    summary = display.one_line(f"{type(exc).__name__}: {exc}")[:300]
    return f"unexpected error while {context} ({summary}); {where}"
