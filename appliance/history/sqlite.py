"""The embedded history: SQLite (WAL) in ``<data dir>/history.sqlite3``, searched through an FTS5 trigram index.

Deletion is real: ``secure_delete`` overwrites freed pages and the WAL is checkpointed after a conversation is deleted.
A failure is named for what it really is (full disk, read-only folder, lock, damage; ``storage_problem``).
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.history.records import HistoryError, message_columns, storage_error

DB_FILE = "history.sqlite3"
LOW_SPACE = 1 << 20  # bytes: below this much free space, an unspecific I/O error is taken for a full disk


def storage_problem(path: Path, exc: sqlite3.Error | OSError, outcome: str) -> HistoryError:
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
    return storage_error(problem, advice, outcome)


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _low_space(folder: Path) -> bool:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize < LOW_SPACE or (st.f_files > 0 and st.f_favail == 0)


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


class SQLiteBackend:
    """``store.Backend`` on the file ``<directory>/history.sqlite3``."""

    errors = (sqlite3.Error, OSError)
    migrations = {1: _V1, 2: _V2}

    def __init__(self, directory: Path) -> None:
        self.path = directory / DB_FILE
        self.where = str(self.path)

    def open(self) -> None:
        if self.path.exists() and self.path.stat().st_size and not self._has_sqlite_header():
            raise HistoryError(f"{self.path} is not a history database (corrupt or foreign file); it was left untouched: "
                               "move it away to start a new history")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _has_sqlite_header(self) -> bool:
        with self.path.open("rb") as fh:
            return fh.read(16) == b"SQLite format 3\x00"

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def usable(self, conn: sqlite3.Connection) -> bool:
        return True

    def execute(self, conn: sqlite3.Connection, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        return conn.execute(sql, params)

    @contextmanager
    def transaction(self, conn: sqlite3.Connection, schema: bool = False) -> Iterator[None]:
        """BEGIN IMMEDIATE takes the database's write lock at once, which also keeps other processes from migrating."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed COMMIT (e.g. a full disk) may leave the transaction open
                conn.execute("ROLLBACK")
            raise

    def version(self, conn: sqlite3.Connection) -> int:
        return conn.execute("PRAGMA user_version").fetchone()[0]

    def set_version(self, conn: sqlite3.Connection, version: int) -> None:
        conn.execute(f"PRAGMA user_version={int(version)}")

    def search(self, conn: sqlite3.Connection, text: str, limit: int) -> list:
        """The trigram index finds a phrase of 3 or more characters; a shorter one is a substring scan."""
        if len(text) >= 3:
            phrase = '"' + text.replace('"', '""') + '"'
            return conn.execute(f"SELECT {message_columns('m')} FROM messages_fts f JOIN messages m ON m.id = f.rowid "
                                "WHERE messages_fts MATCH ? ORDER BY m.id DESC LIMIT ?", (phrase, limit)).fetchall()
        return conn.execute(f"SELECT {message_columns()} FROM messages WHERE instr(lower(text), lower(?)) > 0 "
                            "ORDER BY id DESC LIMIT ?", (text, limit)).fetchall()

    def deleted(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def error(self, exc: BaseException, outcome: str) -> HistoryError:
        return storage_problem(self.path, exc, outcome)
