"""``History``: the conversations the app, the CLI and the service read and write, in one place whatever the database.

A message is written once when it is final (the user's before generation starts, the answer when it completes or is
stopped), never per token. Each thread gets its own connection (SQLite's WAL lets the UI thread read while the worker
writes; a server's worker threads each hold one PostgreSQL session). Every query here is plain SQL both databases run
alike, written with ``?`` placeholders; what differs (connecting, transactions, the schema's scripts and where its
version is kept, search, and what a failure means) is the backend's (``Backend``, ``sqlite.py``, ``postgres.py``).

Every database failure leaves this class as a one-line ``HistoryError`` (``Backend.error``). Imports are checked field
by field before anything is written (``transfer.checked_export``).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from appliance.display import one_line
from appliance.history.records import (
    CHANGING,
    NEW_TITLE,
    OPENING,
    READING,
    SAVING,
    SCHEMA_VERSION,
    Conversation,
    HistoryError,
    Message,
    json_or_null,
    message_columns,
    message_from_row,
    pair_turns,
)
from appliance.history.transfer import EXPORT_FORMAT, EXPORT_VERSION, checked_export, markdown

URL_SCHEMES = ("postgresql://", "postgres://")


class Backend(Protocol):
    """What one database does its own way. ``where`` names the database in messages (a path, or a URL without its
    password); ``errors`` are the exceptions ``error`` turns into one line."""

    where: str
    errors: tuple[type[BaseException], ...]
    migrations: dict[int, str]  # version -> script bringing the previous version to it (statements end in ";\n")

    def open(self) -> None: ...  # checks before the first connection (SQLite: the file is a database, its folder exists)
    def connect(self) -> Any: ...
    def usable(self, conn: Any) -> bool: ...  # False: open a new connection for this thread (one that was lost)
    def execute(self, conn: Any, sql: str, params: tuple = ()) -> Any: ...  # a cursor; ``sql`` has ``?`` placeholders
    # one transaction; ``schema``: the schema's, also exclusive of other processes migrating the same database
    def transaction(self, conn: Any, schema: bool = False) -> AbstractContextManager: ...
    def version(self, conn: Any) -> int: ...
    def set_version(self, conn: Any, version: int) -> None: ...
    def search(self, conn: Any, text: str, limit: int) -> list: ...  # rows of ``message_columns()``, newest first
    def deleted(self, conn: Any) -> None: ...  # after a conversation was deleted (SQLite: checkpoint the WAL)
    def error(self, exc: BaseException, outcome: str) -> HistoryError: ...


def backend_for(location: Path | str) -> Backend:
    """A ``postgresql://`` URL's backend, else SQLite in the folder ``location``."""
    if isinstance(location, str) and "://" in location:
        if not location.startswith(URL_SCHEMES):
            scheme = location.split("://", 1)[0][:20]
            raise HistoryError(f"the history URL must start with postgresql:// (got {scheme}://); without a URL the "
                               "history is SQLite in the data folder")
        from appliance.history.postgres import PostgresBackend

        return PostgresBackend(location)
    from appliance.history.sqlite import SQLiteBackend

    return SQLiteBackend(Path(location))


def _reported(outcome: str) -> Callable[[Callable], Callable]:
    """Decorator for ``History`` methods: a database failure inside becomes the backend's one line, never a
    driver's traceback."""
    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def reported(self: History, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except self.backend.errors as exc:
                raise self.backend.error(exc, outcome) from exc
        return reported
    return decorate


class History:
    """Conversations and messages: SQLite in the folder ``location`` (``<folder>/history.sqlite3``), or the PostgreSQL
    database a ``postgresql://`` URL names."""

    def __init__(self, location: Path | str) -> None:
        self.backend = backend_for(location)
        self._local = threading.local()
        self._open()

    @property
    def where(self) -> str:
        """The database as messages name it (a path, or a URL without its password)."""
        return self.backend.where

    @property
    def path(self) -> Path | None:
        """The SQLite database file; None for a server database."""
        return getattr(self.backend, "path", None)

    @_reported(OPENING)
    def _open(self) -> None:
        self.backend.open()
        self._migrate()

    @property
    def conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or not self.backend.usable(conn):
            conn = self._local.conn = self.backend.connect()
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _run(self, sql: str, params: tuple = ()) -> Any:
        return self.backend.execute(self.conn, sql, params)

    def _transaction(self, schema: bool = False) -> AbstractContextManager:
        return self.backend.transaction(self.conn, schema)

    def _migrate(self) -> None:
        """Bring the schema to ``SCHEMA_VERSION``, one version a transaction. The version is read again inside the
        transaction, so two processes opening a new database at once migrate it once."""
        while (version := self.backend.version(self.conn)) < SCHEMA_VERSION:
            with self._transaction(schema=True):
                if self.backend.version(self.conn) == version:  # not migrated by another process meanwhile
                    for statement in self.backend.migrations[version + 1].split(";\n"):
                        if statement.strip():
                            self._run(statement)
                    self.backend.set_version(self.conn, version + 1)
        if version > SCHEMA_VERSION:
            raise HistoryError(f"{self.where} was written by a newer StreamChat (schema {version}); update StreamChat")

    # -- conversations -------------------------------------------------------------------------------------------
    @_reported(SAVING)
    def new_conversation(self, title: str = "") -> int:
        now = time.time()
        return self._insert("INSERT INTO conversations(title, created, updated) VALUES (?, ?, ?) RETURNING id",
                            (title or NEW_TITLE, now, now))

    def _insert(self, sql: str, params: tuple) -> int:
        """The id of the row an ``INSERT ... RETURNING id`` added (every row fetched: SQLite finishes the statement)."""
        return int(self._run(sql, params).fetchall()[0][0])

    @_reported(READING)
    def conversations(self) -> list[Conversation]:
        rows = self._run("SELECT c.id, c.title, c.created, c.updated, (SELECT count(*) FROM messages m WHERE "
                         "m.conversation_id = c.id) FROM conversations c ORDER BY c.updated DESC, c.id DESC").fetchall()
        return [Conversation(int(r[0]), r[1], float(r[2]), float(r[3]), int(r[4])) for r in rows]

    @_reported(READING)
    def conversation(self, conversation_id: int) -> Conversation:
        row = self._run("SELECT id, title, created, updated FROM conversations WHERE id = ?",
                        (conversation_id,)).fetchone()
        if row is None:
            raise HistoryError(f"no conversation {conversation_id} (see `streamchat history list`)")
        return Conversation(int(row[0]), row[1], float(row[2]), float(row[3]), len(self.messages(conversation_id)))

    @_reported(CHANGING)
    def rename(self, conversation_id: int, title: str) -> None:
        self.conversation(conversation_id)
        self._run("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    @_reported(CHANGING)
    def delete(self, conversation_id: int) -> None:
        """Delete a conversation and its messages (on SQLite freed pages are overwritten: secure_delete)."""
        self.conversation(conversation_id)
        with self._transaction():
            self._run("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            self._run("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        self.backend.deleted(self.conn)

    # -- messages ------------------------------------------------------------------------------------------------
    @_reported(SAVING)
    def add_message(self, conversation_id: int, role: str, text: str, bundle_id: str = "", settings: dict | None = None,
                    stop_reason: str = "", timings: dict | None = None) -> int:
        now = time.time()
        with self._transaction():
            message_id = self._add(conversation_id, role, text, now, bundle_id, settings, stop_reason, timings)
            self._run("UPDATE conversations SET updated = ?, title = CASE WHEN title = ? AND ? THEN ? ELSE title END "
                      "WHERE id = ?", (now, NEW_TITLE, role == "user", one_line(text)[:40], conversation_id))
        return message_id

    def _add(self, conversation_id: int, role: str, text: str, created: float, bundle_id: str, settings: dict | None,
             stop_reason: str, timings: dict | None) -> int:
        return self._insert(
            "INSERT INTO messages(conversation_id, role, text, created, bundle_id, settings, stop_reason, timings) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (conversation_id, role, text, created, bundle_id, json_or_null(settings), stop_reason, json_or_null(timings)))

    @_reported(READING)
    def messages(self, conversation_id: int) -> list[Message]:
        rows = self._run(f"SELECT {message_columns()} FROM messages WHERE conversation_id = ? ORDER BY id",
                         (conversation_id,))
        return [message_from_row(r) for r in rows.fetchall()]

    @_reported(CHANGING)
    def delete_from(self, message_id: int) -> None:
        """Delete a message and everything after it in its conversation (edit-and-resend, regenerate)."""
        row = self._run("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is not None:
            self._run("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (row[0], message_id))

    @_reported(READING)
    def turns(self, conversation_id: int) -> list[tuple[str, str]]:
        """(query, answer) pairs for the prompt; a user message whose answer never arrived is skipped."""
        return pair_turns((m.role, m.text) for m in self.messages(conversation_id))

    @_reported(READING)
    def search(self, text: str, limit: int = 50) -> list[Message]:
        """Messages containing ``text`` as a substring, ignoring letter case, newest first (each backend answers from
        its own trigram index: SQLite's FTS5 trigram tokenizer, PostgreSQL's pg_trgm)."""
        text = text.strip()
        return [message_from_row(r) for r in self.backend.search(self.conn, text, limit)] if text else []

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

    def export_markdown(self, conversation_id: int | None = None) -> str:
        """Markdown for reading: stored text cannot forge a title or turn header, nor carry raw HTML."""
        return markdown(self.export_json(conversation_id))

    @_reported(SAVING)
    def import_json(self, data: object) -> list[int]:
        """Add the conversations of an ``export_json`` document (as new conversations); returns their ids.

        Every field is checked (type, known role and stop reason, times from 1970 to 9999, flat finite settings) before
        anything is written, so a hostile document is refused whole with one line naming the bad field. A conversation
        already stored is skipped, so importing the same export twice adds nothing: the same title and start time, and
        the same messages (role, text and time, in order). The document's conversations that are not among the
        returned ids are the ones skipped.
        """
        conversations = checked_export(data)
        ids = []
        with self._transaction():
            for conv in conversations:
                if self._stored(conv):
                    continue
                cid = self._insert("INSERT INTO conversations(title, created, updated) VALUES (?, ?, ?) RETURNING id",
                                   (conv["title"], conv["created"], conv["updated"]))
                for m in conv["messages"]:
                    self._add(cid, m["role"], m["text"], m["created"], m["bundle_id"], m["settings"], m["stop_reason"],
                              m["timings"])
                ids.append(cid)
        return ids

    def _stored(self, conv: dict) -> bool:
        """Whether a conversation with ``conv``'s title, start time and exactly its messages (role, text, time) is
        stored."""
        wanted = [(m["role"], m["text"], m["created"]) for m in conv["messages"]]
        for (cid,) in self._run("SELECT id FROM conversations WHERE title = ? AND created = ?",
                                (conv["title"], conv["created"])).fetchall():
            rows = self._run("SELECT role, text, created FROM messages WHERE conversation_id = ? ORDER BY id", (cid,))
            if [(r[0], r[1], float(r[2])) for r in rows.fetchall()] == wanted:
                return True
        return False
