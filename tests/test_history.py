import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

from appliance.history import DB_FILE, SCHEMA_VERSION, History, HistoryError


@pytest.fixture
def history(tmp_path):
    return History(tmp_path)


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


def test_rename_delete_and_secure_delete(history):
    cid = _conversation(history)
    history.rename(cid, "Weather")
    assert history.conversation(cid).title == "Weather"
    history.delete(cid)
    assert history.conversations() == []
    history.close()
    assert b"light jacket" not in (history.path).read_bytes()
    with pytest.raises(HistoryError, match="no conversation"):
        history.conversation(cid)


def test_export_import_round_trip(history, tmp_path):
    cid = _conversation(history)
    exported = history.export_json()
    other = History(tmp_path / "other")
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


def test_migration_from_version_1(tmp_path):
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.executescript("""
        CREATE TABLE conversations (id INTEGER PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL,
            updated REAL NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL REFERENCES conversations(id)
            ON DELETE CASCADE, role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), text TEXT NOT NULL,
            created REAL NOT NULL, stop_reason TEXT NOT NULL DEFAULT '');
        INSERT INTO conversations VALUES (1, 'old chat', 1.0, 2.0);
        INSERT INTO messages VALUES (1, 1, 'user', '旧的问题 about migrations', 1.0, '');
        INSERT INTO messages VALUES (2, 1, 'assistant', 'an old answer', 2.0, 'eos');
        PRAGMA user_version = 1;
    """)
    conn.close()
    history = History(tmp_path)
    assert sqlite3.connect(tmp_path / DB_FILE).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert history.turns(1) == [("旧的问题 about migrations", "an old answer")]
    assert [m.id for m in history.search("migrations")] == [1]
    assert history.messages(1)[1].bundle_id == ""


def test_newer_schema_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(HistoryError, match="newer StreamChat"):
        History(tmp_path)


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


def test_survives_a_killed_process(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    assert proc.stdout.readline().strip() == "stored"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    history = History(tmp_path)
    [conv] = history.conversations()
    assert [m.text for m in history.messages(conv.id)] == ["question before the crash"]
    assert history.turns(conv.id) == []  # the unanswered question is not replayed into prompts
    assert sqlite3.connect(history.path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
