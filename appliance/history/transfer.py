"""Moving conversations in and out of a history, the same for every backend: the export document's checks (every
field, before anything is written), the Markdown export's escaping, and the export file read and written whole."""

from __future__ import annotations

import html
import json
import math
import os
import re
import tempfile
from pathlib import Path

from appliance.display import quoted
from appliance.folders import Refused, read_small_file, why_not_writable
from appliance.history.records import ROLES, STOP_REASONS, HistoryError

EXPORT_FORMAT, EXPORT_VERSION = "streamchat-history", 1
# The largest history import read (a long history exports to tens of MB). Parsing still takes a few times the file's
# size in memory, up to ~20x for a file of nothing but empty arrays.
IMPORT_CAP = 256 << 20
LAST_TIME = 253402300799  # 9999-12-31T23:59:59Z: the latest time (in seconds since 1970) that can be shown as a date


def read_export(path: Path) -> object:
    """The parsed JSON of a history export file; unreadable, invalid or too deeply nested JSON is one line.

    Only a regular file of at most ``IMPORT_CAP`` bytes is read (``read_small_file``)."""
    try:
        return json.loads(read_small_file(path, IMPORT_CAP).decode("utf-8"))
    except Refused as exc:
        if exc.size is None:
            raise HistoryError(f"cannot import {path}: {exc.reason}; nothing was imported") from exc
        raise HistoryError(f"cannot import {path}: it is {exc.size} bytes, more than the {IMPORT_CAP} (256 MiB) a history "
                           "export may have; nothing was imported") from exc
    except RecursionError as exc:
        raise HistoryError(f"{path} is nested too deeply to be a history export; nothing was imported") from exc
    except OSError as exc:
        raise HistoryError(f"cannot read {path}: {exc.strerror}; nothing was imported") from exc
    except ValueError as exc:  # also UnicodeDecodeError
        raise HistoryError(f"{path} is not a JSON history export ({exc}); nothing was imported") from exc


def write_export(path: Path, text: str) -> None:
    """Write an export whole or not at all (a temporary file beside it, then a rename): a missing folder, a full disk
    or a refused write is one line and leaves a file already at ``path`` as it was. Only a regular file is replaced:
    anything else at ``path`` (a folder, FIFO, device or symlink, judged without following the link) is refused."""
    if (problem := why_not_writable(path)) is not None:
        raise HistoryError(problem)
    tmp: Path | None = None
    try:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False) as fh:
            tmp = Path(fh.name)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise HistoryError(f"cannot write {path}: {exc.strerror or exc}") from exc

def markdown(document: dict) -> str:
    """An ``export_json`` document as Markdown for reading: stored text cannot forge a title or turn header, nor carry raw
    HTML (see ``_md_*``)."""
    parts = []
    for conv in document["conversations"]:
        parts.append(f"# {_md_line(conv['title'])}\n")
        for m in conv["messages"]:
            who = "**You**" if m["role"] == "user" else "**StreamChat**"
            stopped = f" _(stopped: {_md_line(m['stop_reason'])})_" if m["stop_reason"] not in ("", "eos") else ""
            parts.append(f"{who}{stopped}\n\n{_md_quote(m['text'])}\n")
    return "\n".join(parts)


# -- Markdown escaping ---------------------------------------------------------------------------------------------
def _md_line(text: str) -> str:
    """``text`` as inert inline Markdown on one line: whitespace and line breaks collapsed to single spaces, HTML
    special characters as entities, and emphasis, code, link and escape characters backslash-escaped."""
    return re.sub(r"([\\`*_\[\]!~])", r"\\\1", html.escape(" ".join(text.split()), quote=False))


def _md_quote(text: str) -> str:
    """``text`` as a blockquote with HTML special characters as entities. Its own Markdown (lists, code) still renders,
    but every line (split at every character Markdown or Python count as a line break) starts with ``>``, so nothing in
    it can start a turn header, a heading or raw HTML outside the quote. Backslashes and square brackets are
    backslash-escaped, so no link, image (``![...](url)`` would be fetched by a viewer) or link reference definition can
    form; they render as themselves outside code."""
    lines = re.sub(r"([\\\[\]])", r"\\\1", html.escape(text, quote=False)).splitlines() or [""]
    return "\n".join(f"> {line}" if line else ">" for line in lines)


# -- import checks -------------------------------------------------------------------------------------------------
_CONVERSATION_FIELDS = ("title", "created", "updated", "messages")
_MESSAGE_FIELDS = ("role", "text", "created", "bundle_id", "settings", "stop_reason", "timings")


def _bad(problem: str) -> HistoryError:
    return HistoryError(f"history import is malformed: {problem}; nothing was imported")


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "true/false", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _name(key: object) -> str:
    """A field name as it can appear in a one-line message."""
    return key if isinstance(key, str) and key.isidentifier() and len(key) <= 40 else json.dumps(str(key)[:40])


def _fields(value: object, where: str, known: tuple[str, ...], required: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise _bad(f"{where} must be an object, got {_json_type(value)}")
    unknown = [_name(k) for k in value if k not in known]
    if unknown:
        raise _bad(f"{where} has unknown field(s) {', '.join(unknown[:5])} (known: {', '.join(known)})")
    missing = [k for k in required if k not in value]
    if missing:
        raise _bad(f"{where} lacks {', '.join(missing)}")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where} must be a string, got {_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(f"{where} is not valid Unicode (a lone surrogate at {exc.start})") from exc
    return value


def _timestamp(value: object, where: str) -> float:
    """A time in seconds since 1970 that the history can show as a date (``time.localtime`` overflows on 1e308)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{where} must be a number, got {_json_type(value)}")
    if not 0 <= value <= LAST_TIME:  # also NaN
        raise _bad(f"{where} must be a number of seconds since 1970 from 0 to {LAST_TIME} (the end of the year 9999), "
                   f"got {quoted(value, 30)}")
    return float(value)


def _one_of(value: object, where: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _bad(f"{where} must be one of {', '.join(a or repr(a) for a in allowed)}")
    return str(value)


def _flat(value: object, where: str) -> dict | None:
    """Settings and timings: null, or an object of finite numbers, strings, true/false and nulls (nothing nested; NaN
    and Infinity would make the JSON export non-standard)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(f"{where} must be an object or null, got {_json_type(value)}")
    for key, item in value.items():
        _string(key, f"{where} key")
        if isinstance(item, str):
            _string(item, f"{where}.{_name(key)}")
        elif isinstance(item, float) and not math.isfinite(item):
            raise _bad(f"{where}.{_name(key)} must be a finite number, got {item!r}")
        elif item is not None and not isinstance(item, bool | int | float):
            raise _bad(f"{where}.{_name(key)} must be a number, string, true/false or null, got {_json_type(item)}")
    return value


def checked_export(data: object) -> list[dict]:
    """The conversations of an export document, every field checked and defaults filled in."""
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise HistoryError(f"not a StreamChat history export (expected format '{EXPORT_FORMAT}')")
    _fields(data, "the document", ("format", "version", "conversations"), ("conversations",))
    version = data.get("version", EXPORT_VERSION)
    if isinstance(version, bool) or version != EXPORT_VERSION:
        raise _bad(f"version {str(version)[:20]} is not supported (this StreamChat reads version {EXPORT_VERSION})")
    if not isinstance(data["conversations"], list):
        raise _bad(f"conversations must be a list, got {_json_type(data['conversations'])}")
    out = []
    for i, raw in enumerate(data["conversations"]):
        where = f"conversations[{i}]"
        conv = _fields(raw, where, _CONVERSATION_FIELDS, _CONVERSATION_FIELDS)
        if not isinstance(conv["messages"], list):
            raise _bad(f"{where}.messages must be a list, got {_json_type(conv['messages'])}")
        messages = []
        for j, raw_message in enumerate(conv["messages"]):
            at = f"{where}.messages[{j}]"
            m = _fields(raw_message, at, _MESSAGE_FIELDS, ("role", "text", "created"))
            messages.append({"role": _one_of(m["role"], f"{at}.role", ROLES), "text": _string(m["text"], f"{at}.text"),
                             "created": _timestamp(m["created"], f"{at}.created"),
                             "bundle_id": _string(m.get("bundle_id", ""), f"{at}.bundle_id"),
                             "settings": _flat(m.get("settings"), f"{at}.settings"),
                             "stop_reason": _one_of(m.get("stop_reason", ""), f"{at}.stop_reason", STOP_REASONS),
                             "timings": _flat(m.get("timings"), f"{at}.timings")})
        out.append({"title": _string(conv["title"], f"{where}.title"),
                    "created": _timestamp(conv["created"], f"{where}.created"),
                    "updated": _timestamp(conv["updated"], f"{where}.updated"), "messages": messages})
    return out
