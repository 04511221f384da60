"""Local conversation history in SQLite: WAL, versioned schema with migrations, full-text search, export/import.

A message is written once when it is final (the user's before generation starts, the answer when it completes or is
stopped), never per token. Each thread gets its own connection; WAL lets the UI thread read while the worker writes.
Deletion is real: ``secure_delete`` overwrites freed pages.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.errors import StreamChatError

SCHEMA_VERSION = 2
DB_FILE = "history.sqlite3"


class HistoryError(StreamChatError):
    """The history database cannot be used; it is never overwritten."""


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
        if self.path.exists() and self.path.stat().st_size and not self._has_sqlite_header():
            raise HistoryError(f"{self.path} is not a history database (corrupt or foreign file); it was left untouched: "
                               "move it away to start a new history")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._migrate(self.conn)
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"{self.path} is damaged ({exc}); it was left untouched: move it away to start a new "
                               "history, or restore a backup") from exc

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
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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
    def new_conversation(self, title: str = "") -> int:
        now = time.time()
        cur = self.conn.execute("INSERT INTO conversations(title, created, updated) VALUES (?, ?, ?)",
                                (title or "New conversation", now, now))
        return int(cur.lastrowid)

    def conversations(self) -> list[Conversation]:
        rows = self.conn.execute(
            "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS n FROM conversations c "
            "ORDER BY updated DESC, id DESC").fetchall()
        return [Conversation(r["id"], r["title"], r["created"], r["updated"], r["n"]) for r in rows]

    def conversation(self, conversation_id: int) -> Conversation:
        row = self.conn.execute("SELECT *, 0 AS n FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise HistoryError(f"no conversation {conversation_id} (see `streamchat history list`)")
        return Conversation(row["id"], row["title"], row["created"], row["updated"], len(self.messages(conversation_id)))

    def rename(self, conversation_id: int, title: str) -> None:
        self.conversation(conversation_id)
        self.conn.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def delete(self, conversation_id: int) -> None:
        """Delete a conversation and its messages; freed pages are overwritten (secure_delete)."""
        self.conversation(conversation_id)
        with self._transaction() as conn:
            conn.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- messages ------------------------------------------------------------------------------------------------
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
                         "'user' THEN ? ELSE title END WHERE id = ?", (now, role, text.strip()[:40], conversation_id))
        return int(cur.lastrowid)

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self.conn.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [self._message(r) for r in rows.fetchall()]

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

    def turns(self, conversation_id: int) -> list[tuple[str, str]]:
        """(query, answer) pairs for the prompt; a user message whose answer never arrived is skipped."""
        pairs, pending = [], None
        for m in self.messages(conversation_id):
            if m.role == "user":
                pending = m.text
            elif pending is not None:
                pairs.append((pending, m.text))
                pending = None
        return pairs

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
    def export_json(self, conversation_id: int | None = None) -> dict:
        ids = [conversation_id] if conversation_id is not None else [c.id for c in reversed(self.conversations())]
        out = []
        for cid in ids:
            conv = self.conversation(cid)
            out.append({"title": conv.title, "created": conv.created, "updated": conv.updated,
                        "messages": [{k: v for k, v in asdict(m).items() if k not in ("id", "conversation_id")}
                                     for m in self.messages(cid)]})
        return {"format": "streamchat-history", "version": 1, "conversations": out}

    def export_markdown(self, conversation_id: int | None = None) -> str:
        parts = []
        for conv in self.export_json(conversation_id)["conversations"]:
            parts.append(f"# {conv['title']}\n")
            for m in conv["messages"]:
                who = "**You**" if m["role"] == "user" else "**StreamChat**"
                stopped = f" _(stopped: {m['stop_reason']})_" if m["stop_reason"] not in ("", "eos") else ""
                parts.append(f"{who}{stopped}\n\n{m['text']}\n")
        return "\n".join(parts)

    def import_json(self, data: dict) -> list[int]:
        """Add the conversations of an ``export_json`` document (as new conversations); returns their ids."""
        if not isinstance(data, dict) or data.get("format") != "streamchat-history":
            raise HistoryError("not a StreamChat history export (expected format 'streamchat-history')")
        ids = []
        try:
            with self._transaction() as conn:
                for conv in data.get("conversations", []):
                    cur = conn.execute("INSERT INTO conversations(title, created, updated) VALUES (?, ?, ?)",
                                       (conv["title"], conv["created"], conv["updated"]))
                    cid = int(cur.lastrowid)
                    for m in conv["messages"]:
                        conn.execute(
                            "INSERT INTO messages(conversation_id, role, text, created, bundle_id, settings, "
                            "stop_reason, timings) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (cid, m["role"], m["text"], m["created"], m.get("bundle_id", ""),
                             json.dumps(m["settings"]) if m.get("settings") else None, m.get("stop_reason", ""),
                             json.dumps(m["timings"]) if m.get("timings") else None))
                    ids.append(cid)
        except (KeyError, TypeError, sqlite3.IntegrityError) as exc:
            raise HistoryError(f"history import is malformed ({exc}); nothing was imported") from exc
        return ids
