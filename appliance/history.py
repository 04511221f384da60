"""Local conversation history in SQLite: WAL, versioned schema with migrations, full-text search, export/import.

A message is written once when it is final (the user's before generation starts, the answer when it completes or is
stopped), never per token. Each thread gets its own connection; WAL lets the UI thread read while the worker writes.
Deletion is real: ``secure_delete`` overwrites freed pages.

Every SQLite or file-system failure leaves this module as a one-line ``HistoryError`` that says what is really wrong
(full disk, read-only folder, lock, damage; ``_storage_error``). Imports are checked field by field before anything is
written, and the Markdown export escapes stored text so that it can neither start a turn nor carry raw HTML.
"""

from __future__ import annotations

import errno
import functools
import html
import json
import math
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.display import one_line, quoted
from appliance.errors import StreamChatError
from appliance.folders import Refused, read_small_file, why_not_writable

SCHEMA_VERSION = 2
DB_FILE = "history.sqlite3"
EXPORT_FORMAT, EXPORT_VERSION = "streamchat-history", 1
ROLES = ("user", "assistant")
STOP_REASONS = ("", "eos", "max_new_tokens", "context", "cancelled", "safety", "blocked", "error")
LOW_SPACE = 1 << 20  # bytes: below this much free space, an unspecific I/O error is taken for a full disk
# The largest history import read (a long history exports to tens of MB). Parsing still takes a few times the file's
# size in memory, up to ~20x for a file of nothing but empty arrays.
IMPORT_CAP = 256 << 20
LAST_TIME = 253402300799  # 9999-12-31T23:59:59Z: the latest time (in seconds since 1970) that can be shown as a date

# what a failed call could not do, ending its error message
OPENING, READING = "the history cannot be opened", "the history cannot be read"
SAVING, CHANGING = "nothing was saved", "nothing was changed"


class HistoryError(StreamChatError):
    """The history database cannot be used; it is never overwritten.

    When storage failed, ``problem`` says what is wrong (e.g. "the disk holding ... is full") and ``advice`` what the
    user can do about it, so that a caller keeping unsaved messages can word its own message around them.
    """

    def __init__(self, message: str, problem: str = "", advice: str = "") -> None:
        super().__init__(message)
        self.problem, self.advice = problem, advice


def _storage_error(path: Path, exc: sqlite3.Error | OSError, outcome: str) -> HistoryError:
    """What really went wrong with the database at ``path``, followed by ``outcome`` (what was not done).

    SQLite's error code decides where it is specific (FULL, READONLY, BUSY, CORRUPT, ...). Where it is not (IOERR,
    CANTOPEN: a -wal or -shm file could not be created or grown), the folder decides: not writable means a read-only
    folder, almost no free space a full disk. Only SQLite's own corruption codes are called damage.
    """
    folder = path.parent
    if isinstance(exc, OSError):
        kind = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "readonly", errno.EACCES: "readonly",
                errno.EPERM: "readonly"}.get(exc.errno or 0, "")
    else:
        code = (getattr(exc, "sqlite_errorname", None) or "").removeprefix("SQLITE_").split("_")[0]  # IOERR_SHMSIZE
        kind = {"FULL": "full", "READONLY": "readonly", "PERM": "readonly", "BUSY": "locked", "LOCKED": "locked",
                "CORRUPT": "damaged", "NOTADB": "damaged"}.get(code, "")
        if not kind and code in ("IOERR", "CANTOPEN"):
            existing = _nearest_existing(folder)
            kind = "readonly" if not os.access(existing, os.W_OK) else "full" if _low_space(existing) else ""
    if kind == "damaged":
        return HistoryError(f"{path} is damaged ({exc}); it was left untouched: move it away to start a new history, or "
                            "restore a backup", problem=f"{path} is damaged ({exc})",
                            advice="move it away to start a new history")
    problem, advice = {
        "full": (f"the disk holding {path} is full", "free space"),
        "readonly": (f"the data folder {folder} is read-only for StreamChat (a read-only disk or no write permission)",
                     "make it writable or choose another data folder (STREAMCHAT_DATA_DIR or the data_dir setting)"),
        "locked": (f"{path} is locked by another program (another StreamChat?)", "close that program"),
    }.get(kind, (f"cannot use the history database {path} ({exc})", "check the disk"))
    return HistoryError(f"{problem}: {outcome}; {advice} and try again", problem=problem, advice=advice)


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _low_space(folder: Path) -> bool:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize < LOW_SPACE or (st.f_files > 0 and st.f_favail == 0)


def _reported(outcome: str) -> Callable[[Callable], Callable]:
    """Decorator for ``History`` methods: a SQLite or file-system failure inside becomes ``_storage_error``'s one line,
    never a sqlite3 traceback."""
    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def reported(self: History, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (sqlite3.Error, OSError) as exc:
                raise _storage_error(self.path, exc, outcome) from exc
        return reported
    return decorate


def pair_turns(messages: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(query, answer) pairs from (role, text) in order; a user message whose answer never arrived is skipped."""
    pairs, pending = [], None
    for role, text in messages:
        if role == "user":
            pending = text
        elif pending is not None:
            pairs.append((pending, text))
            pending = None
    return pairs


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str  # user | assistant
    text: str
    created: float
    bundle_id: str = ""
    settings: dict | None = None
    stop_reason: str = ""
    timings: dict | None = None


@dataclass
class Conversation:
    id: int
    title: str
    created: float
    updated: float
    messages: int = 0


_V1 = """
CREATE TABLE conversations (id INTEGER PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL REFERENCES conversations(id)
    ON DELETE CASCADE, role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), text TEXT NOT NULL,
    created REAL NOT NULL, stop_reason TEXT NOT NULL DEFAULT '');
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
"""
_V2 = """
ALTER TABLE messages ADD COLUMN bundle_id TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN settings TEXT;
ALTER TABLE messages ADD COLUMN timings TEXT;
CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='messages', content_rowid='id', tokenize='trigram');
INSERT INTO messages_fts(rowid, text) SELECT id, text FROM messages;
CREATE TRIGGER messages_ai AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text); END;
CREATE TRIGGER messages_ad AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text); END;
"""
MIGRATIONS = {1: _V1, 2: _V2}  # version -> script that brings the previous version to it


class History:
    """Conversations and messages in ``<data dir>/history.sqlite3``."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / DB_FILE
        self._local = threading.local()
        self._open()

    @_reported(OPENING)
    def _open(self) -> None:
        if self.path.exists() and self.path.stat().st_size and not self._has_sqlite_header():
            raise HistoryError(f"{self.path} is not a history database (corrupt or foreign file); it was left untouched: "
                               "move it away to start a new history")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate(self.conn)

    def _has_sqlite_header(self) -> bool:
        with self.path.open("rb") as fh:
            return fh.read(16) == b"SQLite format 3\x00"

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def _transaction(self):
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed COMMIT (e.g. a full disk) may leave the transaction open
                conn.execute("ROLLBACK")
            raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(f"{self.path} was written by a newer StreamChat (schema {version}); update StreamChat")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction():
                for statement in MIGRATIONS[target].split(";\n"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={target}")

    # -- conversations -------------------------------------------------------------------------------------------
    @_reported(SAVING)
    def new_conversation(self, title: str = "") -> int:
        now = time.time()
        cur = self.conn.execute("INSERT INTO conversations(title, created, updated) VALUES (?, ?, ?)",
                                (title or "New conversation", now, now))
        return int(cur.lastrowid)

    @_reported(READING)
    def conversations(self) -> list[Conversation]:
        rows = self.conn.execute(
            "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS n FROM conversations c "
            "ORDER BY updated DESC, id DESC").fetchall()
        return [Conversation(r["id"], r["title"], r["created"], r["updated"], r["n"]) for r in rows]

    @_reported(READING)
    def conversation(self, conversation_id: int) -> Conversation:
        row = self.conn.execute("SELECT *, 0 AS n FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise HistoryError(f"no conversation {conversation_id} (see `streamchat history list`)")
        return Conversation(row["id"], row["title"], row["created"], row["updated"], len(self.messages(conversation_id)))

    @_reported(CHANGING)
    def rename(self, conversation_id: int, title: str) -> None:
        self.conversation(conversation_id)
        self.conn.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    @_reported(CHANGING)
    def delete(self, conversation_id: int) -> None:
        """Delete a conversation and its messages; freed pages are overwritten (secure_delete)."""
        self.conversation(conversation_id)
        with self._transaction() as conn:
            conn.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- messages ------------------------------------------------------------------------------------------------
    @_reported(SAVING)
    def add_message(self, conversation_id: int, role: str, text: str, bundle_id: str = "", settings: dict | None = None,
                    stop_reason: str = "", timings: dict | None = None) -> int:
        now = time.time()
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO messages(conversation_id, role, text, created, bundle_id, settings, stop_reason, timings) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, role, text, now, bundle_id, json.dumps(settings) if settings else None, stop_reason,
                 json.dumps(timings) if timings else None))
            conn.execute("UPDATE conversations SET updated = ?, title = CASE WHEN title = 'New conversation' AND ? = "
                         "'user' THEN ? ELSE title END WHERE id = ?", (now, role, one_line(text)[:40], conversation_id))
        return int(cur.lastrowid)

    @_reported(READING)
    def messages(self, conversation_id: int) -> list[Message]:
        rows = self.conn.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [self._message(r) for r in rows.fetchall()]

    @_reported(CHANGING)
    def delete_from(self, message_id: int) -> None:
        """Delete a message and everything after it in its conversation (edit-and-resend, regenerate)."""
        row = self.conn.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is not None:
            self.conn.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (row[0], message_id))

    @staticmethod
    def _message(r: sqlite3.Row) -> Message:
        return Message(r["id"], r["conversation_id"], r["role"], r["text"], r["created"], r["bundle_id"],
                       json.loads(r["settings"]) if r["settings"] else None, r["stop_reason"],
                       json.loads(r["timings"]) if r["timings"] else None)

    @_reported(READING)
    def turns(self, conversation_id: int) -> list[tuple[str, str]]:
        """(query, answer) pairs for the prompt; a user message whose answer never arrived is skipped."""
        return pair_turns((m.role, m.text) for m in self.messages(conversation_id))

    @_reported(READING)
    def search(self, text: str, limit: int = 50) -> list[Message]:
        """Messages containing ``text`` (FTS5 trigram index; substring scan for queries under 3 characters)."""
        text = text.strip()
        if not text:
            return []
        if len(text) >= 3:
            phrase = '"' + text.replace('"', '""') + '"'
            rows = self.conn.execute("SELECT m.* FROM messages_fts f JOIN messages m ON m.id = f.rowid "
                                     "WHERE messages_fts MATCH ? ORDER BY m.id DESC LIMIT ?", (phrase, limit))
        else:
            rows = self.conn.execute("SELECT * FROM messages WHERE instr(lower(text), lower(?)) > 0 ORDER BY id DESC "
                                     "LIMIT ?", (text, limit))
        return [self._message(r) for r in rows.fetchall()]

    # -- export / import -----------------------------------------------------------------------------------------
    @_reported(READING)
    def export_json(self, conversation_id: int | None = None) -> dict:
        ids = [conversation_id] if conversation_id is not None else [c.id for c in reversed(self.conversations())]
        out = []
        for cid in ids:
            conv = self.conversation(cid)
            out.append({"title": conv.title, "created": conv.created, "updated": conv.updated,
                        "messages": [{k: v for k, v in asdict(m).items() if k not in ("id", "conversation_id")}
                                     for m in self.messages(cid)]})
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "conversations": out}

    @_reported(READING)
    def export_markdown(self, conversation_id: int | None = None) -> str:
        """Markdown for reading: stored text cannot forge a title or turn header, nor carry raw HTML (see ``_md_*``)."""
        parts = []
        for conv in self.export_json(conversation_id)["conversations"]:
            parts.append(f"# {_md_line(conv['title'])}\n")
            for m in conv["messages"]:
                who = "**You**" if m["role"] == "user" else "**StreamChat**"
                stopped = f" _(stopped: {_md_line(m['stop_reason'])})_" if m["stop_reason"] not in ("", "eos") else ""
                parts.append(f"{who}{stopped}\n\n{_md_quote(m['text'])}\n")
        return "\n".join(parts)

    @_reported(SAVING)
    def import_json(self, data: object) -> list[int]:
        """Add the conversations of an ``export_json`` document (as new conversations); returns their ids.

        Every field is checked (type, known role and stop reason, times from 1970 to 9999, flat finite settings) before
        anything is written, so a hostile document is refused whole with one line naming the bad field. A conversation
        already stored is skipped, so importing the same export twice adds nothing: the same title and start time, and
        the same messages (role, text and time, in order). The document's conversations that are not among the
        returned ids are the ones skipped.
        """
        conversations = _checked_export(data)
        ids = []
        with self._transaction() as conn:
            for conv in conversations:
                if _stored(conn, conv):
                    continue
                cur = conn.execute("INSERT INTO conversations(title, created, updated) VALUES (?, ?, ?)",
                                   (conv["title"], conv["created"], conv["updated"]))
                cid = int(cur.lastrowid)
                for m in conv["messages"]:
                    conn.execute(
                        "INSERT INTO messages(conversation_id, role, text, created, bundle_id, settings, stop_reason, "
                        "timings) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (cid, m["role"], m["text"], m["created"], m["bundle_id"],
                         json.dumps(m["settings"]) if m["settings"] else None, m["stop_reason"],
                         json.dumps(m["timings"]) if m["timings"] else None))
                ids.append(cid)
        return ids


def _stored(conn: sqlite3.Connection, conv: dict) -> bool:
    """Whether a conversation with ``conv``'s title, start time and exactly its messages (role, text, time) is stored."""
    wanted = [(m["role"], m["text"], m["created"]) for m in conv["messages"]]
    for (cid,) in conn.execute("SELECT id FROM conversations WHERE title = ? AND created = ?",
                               (conv["title"], conv["created"])).fetchall():
        rows = conn.execute("SELECT role, text, created FROM messages WHERE conversation_id = ? ORDER BY id", (cid,))
        if [tuple(r) for r in rows.fetchall()] == wanted:
            return True
    return False


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


def _checked_export(data: object) -> list[dict]:
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
