"""The history's behaviour, on SQLite and on a real PostgreSQL (the ``stores`` fixture runs each test on both)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

from appliance.history import DB_FILE, SCHEMA_VERSION, History, HistoryError
from appliance.history.postgres import PostgresBackend


@pytest.fixture
def history(stores):
    return History(stores.location())


def _raw(location):
    """A connection of its own to the database at ``location`` (what another program would see)."""
    if isinstance(location, str):
        import psycopg

        return psycopg.connect(location, autocommit=True)
    return sqlite3.connect(location / DB_FILE, isolation_level=None)


def _conversation(history):
    cid = history.new_conversation()
    history.add_message(cid, "user", "今天天气怎么样？")
    history.add_message(cid, "assistant", "今天是晴天，适合散步。", stop_reason="eos", timings={"prefill_ms": 3.0},
                        settings={"temperature": 0.95}, bundle_id="demo")
    history.add_message(cid, "user", "What should I wear outside?")
    history.add_message(cid, "assistant", "A light jacket is enough.", stop_reason="cancelled")
    return cid


def test_store_and_read(history):
    cid = _conversation(history)
    assert history.turns(cid) == [("今天天气怎么样？", "今天是晴天，适合散步。"),
                                  ("What should I wear outside?", "A light jacket is enough.")]
    conv = history.conversations()[0]
    assert conv.title == "今天天气怎么样？" and conv.messages == 4
    first_answer = history.messages(cid)[1]
    assert first_answer.timings == {"prefill_ms": 3.0} and first_answer.bundle_id == "demo"
    assert first_answer.settings == {"temperature": 0.95} and first_answer.stop_reason == "eos"


def test_sqlite_uses_wal(tmp_path):
    history = History(tmp_path)
    history.new_conversation()
    assert sqlite3.connect(history.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_search_chinese_and_english(history):
    cid = _conversation(history)
    assert [m.text for m in history.search("晴天")] == ["今天是晴天，适合散步。"]
    assert [m.text for m in history.search("天气怎么")] == ["今天天气怎么样？"]
    assert [m.text for m in history.search("light jacket")] == ["A light jacket is enough."]
    assert [m.text for m in history.search("WEAR")] == ["What should I wear outside?"]
    assert history.search("nothing like this") == [] and history.search("  ") == []
    history.delete(cid)
    assert history.search("晴天") == []


def test_search_short_queries_and_wildcards(history):
    """Under 3 characters (no trigram), and characters that are wildcards to LIKE or quotes to FTS5, are plain text."""
    cid = history.new_conversation()
    for text in ("晴天", "100% sure", "snake_case", 'say "hi"', "a\\b", "Ab"):
        history.add_message(cid, "user", text)
    assert [m.text for m in history.search("晴")] == ["晴天"]
    assert [m.text for m in history.search("ab")] == ["Ab"]
    assert [m.text for m in history.search("%")] == ["100% sure"]
    assert [m.text for m in history.search("e_c")] == ["snake_case"]
    assert history.search("e%c") == [] and [m.text for m in history.search("_")] == ["snake_case"]
    assert [m.text for m in history.search('"hi"')] == ['say "hi"']
    assert [m.text for m in history.search("\\")] == ["a\\b"]
    assert [m.text for m in history.search("a", limit=2)] == ["Ab", "a\\b"]  # newest first


def test_rename_and_delete(stores):
    location = stores.location()
    history = History(location)
    cid = _conversation(history)
    history.rename(cid, "Weather")
    assert history.conversation(cid).title == "Weather"
    kept = history.new_conversation("kept")
    history.add_message(kept, "user", "another question")
    history.delete(cid)
    assert [c.id for c in history.conversations()] == [kept]
    raw = _raw(location)
    assert [tuple(r) for r in raw.execute("SELECT conversation_id, text FROM messages").fetchall()] == [
        (kept, "another question")]
    raw.close()
    with pytest.raises(HistoryError, match="no conversation"):
        history.conversation(cid)
    with pytest.raises(HistoryError, match="no conversation"):
        history.delete(cid)


def test_sqlite_delete_overwrites_freed_pages(tmp_path):
    history = History(tmp_path)
    cid = _conversation(history)
    history.delete(cid)
    history.close()
    assert b"light jacket" not in (history.path).read_bytes()


def test_delete_from_a_message_on(history):
    cid = _conversation(history)
    third = history.messages(cid)[2].id
    history.delete_from(third)
    assert [m.text for m in history.messages(cid)] == ["今天天气怎么样？", "今天是晴天，适合散步。"]
    history.delete_from(10**9)  # no such message: nothing happens
    assert len(history.messages(cid)) == 2


def test_export_import_round_trip(history, stores):
    cid = _conversation(history)
    exported = history.export_json()
    other = History(stores.location("other"))
    [new_id] = other.import_json(json.loads(json.dumps(exported)))
    assert other.export_json() == exported
    assert other.turns(new_id) == history.turns(cid)
    md = history.export_markdown(cid)
    assert md.startswith("# 今天天气怎么样？") and "_(stopped: cancelled)_" in md
    with pytest.raises(HistoryError, match="not a StreamChat history"):
        other.import_json({"conversations": []})
    with pytest.raises(HistoryError, match="malformed"):
        other.import_json({"format": "streamchat-history", "conversations": [{"title": "x"}]})
    assert len(other.conversations()) == 1  # the failed import added nothing


# Version 1 of each database's schema as it was released (SQLite's by hand; PostgreSQL's is its first migration).
SQLITE_V1 = """
    CREATE TABLE conversations (id INTEGER PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL,
        updated REAL NOT NULL);
    CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL REFERENCES conversations(id)
        ON DELETE CASCADE, role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), text TEXT NOT NULL,
        created REAL NOT NULL, stop_reason TEXT NOT NULL DEFAULT '');
"""


def _schema_version(location):
    raw = _raw(location)
    try:
        if isinstance(location, str):
            return raw.execute("SELECT version FROM streamchat_schema").fetchone()[0]
        return raw.execute("PRAGMA user_version").fetchone()[0]
    finally:
        raw.close()


def _write_schema(location, version: int, script: str = "") -> None:
    """``script`` run on a new database at ``location``, stamped as schema ``version``."""
    if isinstance(location, str):
        with _raw(location) as raw:
            raw.execute(script or "SELECT 1")
            raw.execute("CREATE TABLE streamchat_schema (version INTEGER NOT NULL)")
            raw.execute("INSERT INTO streamchat_schema VALUES (%s)", (version,))
    else:
        location.mkdir(exist_ok=True)
        raw = _raw(location)
        raw.executescript(script + f"PRAGMA user_version = {version};")
        raw.close()


def test_migration_from_version_1(stores):
    location = stores.location()
    v1 = PostgresBackend.migrations[1] if isinstance(location, str) else SQLITE_V1
    _write_schema(location, 1, v1 + """
        INSERT INTO conversations(title, created, updated) VALUES ('old chat', 1.0, 2.0);
        INSERT INTO messages(conversation_id, role, text, created) VALUES (1, 'user', '旧的问题 about migrations', 1.0);
        INSERT INTO messages(conversation_id, role, text, created, stop_reason) VALUES (1, 'assistant', 'an old answer',
            2.0, 'eos');
    """)
    history = History(location)
    assert _schema_version(location) == SCHEMA_VERSION
    assert history.turns(1) == [("旧的问题 about migrations", "an old answer")]
    assert [m.id for m in history.search("migrations")] == [1] and [m.id for m in history.search("旧的问")] == [1]
    assert history.messages(1)[1].bundle_id == ""
    history.add_message(1, "user", "a new question")  # identities go on after the stored rows
    assert [m.id for m in history.messages(1)] == [1, 2, 3]


def test_newer_schema_is_refused(stores):
    location = stores.location()
    _write_schema(location, 99)
    with pytest.raises(HistoryError) as err:
        History(location)
    where = "postgresql://streamchat@127.0.0.1:" if isinstance(location, str) else str(location / DB_FILE)
    assert str(err.value).startswith(where)
    assert str(err.value).endswith(" was written by a newer StreamChat (schema 99); update StreamChat")
    assert _schema_version(location) == 99


def test_corrupt_file_is_refused_and_kept(tmp_path):
    garbage = b"this is not a database at all" * 100
    (tmp_path / DB_FILE).write_bytes(garbage)
    with pytest.raises(HistoryError, match="left untouched"):
        History(tmp_path)
    assert (tmp_path / DB_FILE).read_bytes() == garbage


def test_damaged_database_is_refused_and_kept(tmp_path):
    history = History(tmp_path)
    _conversation(history)
    history.close()
    data = bytearray((tmp_path / DB_FILE).read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # wreck the schema page behind a valid header
    (tmp_path / DB_FILE).write_bytes(bytes(data))
    with pytest.raises(HistoryError, match="left untouched"):
        History(tmp_path)
    assert (tmp_path / DB_FILE).read_bytes() == bytes(data)


def test_reader_and_writer_threads(history):
    cid = history.new_conversation()
    errors, stop = [], threading.Event()

    def write():
        try:
            for i in range(200):
                history.add_message(cid, "user" if i % 2 == 0 else "assistant", f"message {i}")
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            stop.set()

    def read():
        try:
            seen = 0
            while not stop.is_set():
                messages = history.messages(cid)
                assert len(messages) >= seen
                assert [m.text for m in messages] == [f"message {i}" for i in range(len(messages))]
                seen = len(messages)
                history.search("message")
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write), threading.Thread(target=read), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(history.messages(cid)) == 200


KILL_SCRIPT = """
import sys, time
from appliance.history import History
h = History(sys.argv[1])
cid = h.new_conversation()
h.add_message(cid, "user", "question before the crash")
print("stored", flush=True)
time.sleep(60)   # "generating": the answer is never written
"""


def test_survives_a_killed_process(stores):
    location = stores.location()
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(location)], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "stored"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    history = History(location)
    [conv] = history.conversations()
    assert [m.text for m in history.messages(conv.id)] == ["question before the crash"]
    assert history.turns(conv.id) == []  # the unanswered question is not replayed into prompts
    history.add_message(conv.id, "assistant", "answered after the crash")
    assert history.turns(conv.id) == [("question before the crash", "answered after the crash")]
    if history.path is not None:
        assert sqlite3.connect(history.path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
