"""History under hostile imports, full disks, read-only folders and closed pipes: one clear line, nothing lost.

A full disk is reproduced two ways: SQLite's own page limit (``PRAGMA max_page_count``, the same SQLITE_FULL error a
full disk gives; runs anywhere) and a real 1 MiB tmpfs. Read-only folders are real read-only bind mounts. Mounts are
made inside a private mount namespace (``unshare -m``), so they need root (CI runs as root) and vanish with the process;
without that the tests say why they skip.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.history import DB_FILE, History, HistoryError
from appliance.settings import Settings
from streamchat.cli import main
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def _can_mount() -> bool:
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs `unshare -m` and mount (root) for a real tmpfs or "
                                                          "read-only bind mount")


def _env(tmp_path: Path, data: Path) -> dict:
    return {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(ROOT), "STREAMCHAT_DATA_DIR": str(data),
            "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"), "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache")}


def _in_namespace(setup: str, *argv: str) -> list[str]:
    """``argv`` run in a private mount namespace after the shell lines ``setup`` (mounts, fills)."""
    return ["unshare", "-m", "sh", "-ec", setup + '\nexec "$@"', "sh", *argv]


def _streamchat(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamchat", *args]


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def _stored(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [tuple(r) for r in conn.execute("SELECT role, text FROM messages ORDER BY id")]
    finally:
        conn.close()


def _conversation(history: History) -> int:
    cid = history.new_conversation()
    history.add_message(cid, "user", "a question kept before the disk filled")
    history.add_message(cid, "assistant", "an answer kept before the disk filled", stop_reason="eos")
    return cid


def _fill_pages(history: History) -> None:
    """Let the connection grow the database by no more pages, as a full disk would (SQLITE_FULL)."""
    conn = history.conn
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")


def _free_pages(history: History) -> None:
    history.conn.execute("PRAGMA max_page_count = 1073741823")


# -- full disk ------------------------------------------------------------------------------------------------------
def test_full_database_is_one_line_and_keeps_what_is_stored(tmp_path):
    history = History(tmp_path)
    cid = _conversation(history)
    _fill_pages(history)
    with pytest.raises(HistoryError) as err:
        history.add_message(cid, "user", "x" * 20_000)
    assert str(err.value) == (f"the disk holding {history.path} is full: nothing was saved; free space and try again")
    assert _stored(history.path) == [("user", "a question kept before the disk filled"),
                                     ("assistant", "an answer kept before the disk filled")]
    _free_pages(history)
    history.add_message(cid, "user", "after freeing space")  # the connection is usable again (no open transaction)
    assert [m.text for m in history.messages(cid)][-1] == "after freeing space"


def _session(reference_engine, tokenizer, history):
    from appliance.session import ChatSession

    settings = Settings()
    settings.generation.max_new_tokens, settings.context_budget = 8, 256
    settings.safety.mode = "off"
    return ChatSession(reference_engine, tokenizer, settings, history, model_id="fixture")


def test_session_keeps_the_message_a_full_disk_refused(reference_engine, tokenizer, tmp_path):
    history = History(tmp_path)
    session = _session(reference_engine, tokenizer, history)
    "".join(session.send("first question", greedy=True))
    _fill_pages(history)
    big = "second question " * 1000  # needs new pages
    shown = []
    with pytest.raises(HistoryError) as err:
        for delta in session.send(big, greedy=True):
            shown.append(delta)
    assert shown and "".join(shown) == session.last.response  # the answer still came
    assert str(err.value).startswith(f"the disk holding {history.path} is full: 2 messages are not saved yet (kept "
                                     "in memory); free space and they are saved with the next message")
    assert session.turns()[-1] == (big, session.last.response)  # the next prompt still sees the turn
    assert [t for _, t in _stored(history.path)][0] == "first question"
    assert len(_stored(history.path)) == 2
    with pytest.raises(HistoryError, match=r"is full: 2 messages of this chat could not be saved$"):
        session.save_unsaved()  # what quitting now would say
    _free_pages(history)
    "".join(session.send("third question", greedy=True))
    stored = _stored(history.path)
    assert [(role, text) for role, text in stored if role == "user"] == [
        ("user", "first question"), ("user", big), ("user", "third question")]
    assert [role for role, _ in stored] == ["user", "assistant"] * 3
    assert len(history.conversations()) == 1


class _Chat:
    """An interactive ``streamchat chat`` on a pipe: send a line, wait for the next prompt."""

    def __init__(self, argv: list[str], env: dict) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, text=True, encoding="utf-8", cwd=ROOT)
        self.out: queue.Queue[str] = queue.Queue()
        self.stdout, self.stderr = "", ""
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True).start()
        self.err: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True).start()

    @staticmethod
    def _pump(stream, into: queue.Queue) -> None:
        while chunk := stream.read(1):
            into.put(chunk)

    def wait_prompt(self, timeout: float = 120) -> str:
        """Everything printed up to the next ``> `` prompt."""
        start, deadline = len(self.stdout), time.monotonic() + timeout
        while len(self.stdout) == start or not self.stdout.endswith("\n> "):
            self.stdout += self.out.get(timeout=max(0.1, deadline - time.monotonic()))
        return self.stdout[start:]

    def error_line(self, timeout: float = 10) -> str:
        """The next ``error:`` line on stderr."""
        deadline = time.monotonic() + timeout
        while not re.search(r"^error: .*\n", self.stderr, re.M):
            self.stderr += self.err.get(timeout=max(0.1, deadline - time.monotonic()))
        line = re.search(r"^error: .*\n", self.stderr, re.M).group(0)
        self.stderr = self.stderr.replace(line, "", 1)
        return line.strip()

    def say(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.wait_prompt()


def _copy_database(path: Path, folder: Path) -> Path:
    """A copy of an idle database and its WAL (SQLite itself would resolve a /proc/PID/root path outside the mount)."""
    folder.mkdir()
    for name in (path.name, path.name + "-wal"):
        shutil.copyfile(path.parent / name, folder / name)
    return folder / path.name


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == 28  # ENOSPC
    finally:
        os.close(fd)
    return filler


@needs_mount
def test_chat_on_a_disk_that_fills_up_keeps_the_typed_message(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    env = _env(tmp_path, data)
    chat = _Chat(_in_namespace(f"mount -t tmpfs -o size=1m tmpfs {data}",
                               *_streamchat("chat", "--checkpoint", str(TINY), "--greedy", "--max-new-tokens", "4")), env)
    try:
        chat.wait_prompt()
        inside = Path(f"/proc/{chat.proc.pid}/root") / str(data).lstrip("/")  # the tmpfs as the chat sees it
        chat.say("first question")
        filler = _fill(inside)
        printed = chat.say("typed while the disk is full")
        assert "error: " not in printed and chat.proc.poll() is None  # the chat keeps running, the answer is shown
        assert chat.error_line() == (f"error: the disk holding {data / DB_FILE} is full: 2 messages are not saved yet "
                                     "(kept in memory); free space and they are saved with the next message")
        filler.unlink()
        chat.say("after freeing space")
        assert "error: " not in chat.stderr
        stored = _stored(_copy_database(inside / DB_FILE, tmp_path / "copy"))
        assert [text for role, text in stored if role == "user"] == ["first question", "typed while the disk is full",
                                                                     "after freeing space"]
        assert [role for role, _ in stored] == ["user", "assistant"] * 3
        _fill(inside)
        chat.say("typed before quitting on a full disk")
        chat.error_line()
        chat.proc.stdin.write("/exit\n")
        chat.proc.stdin.flush()
        assert chat.proc.wait(timeout=60) == 2  # quitting says what could not be kept
        assert chat.error_line() == f"error: the disk holding {data / DB_FILE} is full: 2 messages of this chat could " \
                                    "not be saved"
    finally:
        if chat.proc.poll() is None:
            chat.proc.kill()
            chat.proc.wait()


@needs_mount
def test_full_disk_at_start_is_not_called_damaged(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {data}\n"
              f"{sys.executable} -c 'from appliance.history import History; h = History(\"{data}\"); "
              f"h.add_message(h.new_conversation(), \"user\", \"kept\"); h.close()'\n"
              f"dd if=/dev/zero of={data}/filler bs=4096 2>/dev/null || true\n")
    probe = f"from appliance.history import DB_FILE; import sqlite3; print(sqlite3.connect('{data}/' + DB_FILE).execute(" \
            "'SELECT text FROM messages').fetchall())"
    proc = subprocess.run(_in_namespace(script, "sh", "-c", f'{" ".join(_streamchat("history", "list"))}; echo "rc=$?"; '
                                        f'rm {data}/filler; {sys.executable} -c "{probe}"'),
                          capture_output=True, text=True, env=_env(tmp_path, data), cwd=ROOT, timeout=120)
    line = _one_error_line(proc.stderr)
    assert line == (f"error: the disk holding {data / DB_FILE} is full: the history cannot be opened; free space and "
                    "try again")
    assert "damaged" not in line
    assert proc.stdout.splitlines()[-2:] == ["rc=2", "[('kept',)]"]  # intact once space is free


# -- read-only folders ----------------------------------------------------------------------------------------------
@needs_mount
@pytest.mark.parametrize("with_wal", [False, True])
def test_read_only_folder_with_a_database_is_not_called_damaged(tmp_path, with_wal):
    data = tmp_path / "data"
    history = History(data)
    _conversation(history)
    holder = sqlite3.connect(history.path) if with_wal else None  # keeps -wal and -shm beside the database
    if holder:
        holder.execute("SELECT 1").fetchall()
    else:
        history.close()
    before = history.path.read_bytes()
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_export()), encoding="utf-8")
    proc = subprocess.run(_in_namespace(f"mount --bind -o ro {data} {data}", *_streamchat("history", "import", str(export))),
                          capture_output=True, text=True, env=_env(tmp_path, data), cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert f"{data} is read-only" in line and "damaged" not in line
    assert "STREAMCHAT_DATA_DIR" in line
    assert history.path.read_bytes() == before


@needs_mount
@pytest.mark.parametrize("sub", ["", "missing/deeper"])
def test_read_only_folder_without_a_database_is_one_line(tmp_path, sub):
    ro = tmp_path / "ro"
    ro.mkdir()
    data = ro / sub if sub else ro
    proc = subprocess.run(_in_namespace(f"mount --bind -o ro {ro} {ro}", *_streamchat("history", "list")),
                          capture_output=True, text=True, env=_env(tmp_path, data), cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "is read-only" in line and "damaged" not in line and "Traceback" not in proc.stderr
    assert list(ro.iterdir()) == []


def test_corrupt_database_is_still_called_damaged(tmp_path):
    history = History(tmp_path)
    _conversation(history)
    history.close()
    data = bytearray(history.path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)
    history.path.write_bytes(bytes(data))
    with pytest.raises(HistoryError, match=r"is damaged .*left untouched: move it away"):
        History(tmp_path)


def test_locked_database_says_locked(tmp_path):
    history = History(tmp_path)
    cid = _conversation(history)
    other = sqlite3.connect(history.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    history.conn.execute("PRAGMA busy_timeout = 50")
    try:
        with pytest.raises(HistoryError, match=rf"^{re.escape(str(history.path))} is locked by another program"):
            history.add_message(cid, "user", "blocked")
    finally:
        other.execute("ROLLBACK")
    history.add_message(cid, "user", "after the lock")


# -- imports (on SQLite and PostgreSQL) --------------------------------------------------------------------------------
def _export(**conv_changes) -> dict:
    message = {"role": "user", "text": "hi", "created": 1.0, "bundle_id": "", "settings": None, "stop_reason": "",
               "timings": None}
    conv = {"title": "t", "created": 1.0, "updated": 2.0, "messages": [message]}
    for key, value in conv_changes.items():
        if key.startswith("m_"):
            message[key[2:]] = value
        else:
            conv[key] = value
    return {"format": "streamchat-history", "version": 1, "conversations": [conv]}


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("doc, fragment", [
    (_export(title={"a": 1}), "conversations[0].title must be a string, got object"),
    (_export(title=None), "conversations[0].title must be a string, got null"),
    (_export(created="yesterday"), "conversations[0].created must be a number"),
    (_export(updated=True), "conversations[0].updated must be a number"),
    (_export(created=float("nan")), "conversations[0].created must be a number"),
    (_export(messages={"0": {}}), "conversations[0].messages must be a list"),
    (_export(extra=1), "conversations[0] has unknown field(s) extra"),
    (_export(m_role="system"), "conversations[0].messages[0].role must be one of user, assistant"),
    (_export(m_text=["hi"]), "conversations[0].messages[0].text must be a string, got array"),
    (_export(m_text="\ud800"), "conversations[0].messages[0].text is not valid Unicode"),
    (_export(m_stop_reason="eos\n\n**You**\n\ninjected"), "conversations[0].messages[0].stop_reason must be one of"),
    (_export(m_settings=_deep(200_000)), "conversations[0].messages[0].settings must be an object"),
    (_export(m_settings={"a": _deep(10)}), "conversations[0].messages[0].settings.a must be a number, string, "
                                           "true/false or null"),
    (_export(m_timings={"a": {"b": 1}}), "conversations[0].messages[0].timings.a must be a number"),
    (_export(m_bundle_id=7), "conversations[0].messages[0].bundle_id must be a string"),
    ({"format": "streamchat-history", "version": 1, "conversations": {}}, "conversations must be a list"),
    ({"format": "streamchat-history", "version": 9, "conversations": []}, "version 9 is not supported"),
    ({"format": "streamchat-history", "version": 1, "conversations": [[]]}, "conversations[0] must be an object"),
])
def test_hostile_import_is_refused_whole(stores, doc, fragment):
    history = History(stores.location())
    _conversation(history)
    with pytest.raises(HistoryError) as err:
        history.import_json(doc)
    assert fragment in str(err.value) and str(err.value).endswith("nothing was imported")
    assert len(history.conversations()) == 1


def test_import_of_a_well_formed_export_still_works(stores):
    history = History(stores.location())
    [cid] = history.import_json(_export(m_settings={"temperature": 0.9, "greedy": False, "seed": None},
                                        m_timings={"prefill_ms": 3.5}))
    assert history.messages(cid)[0].settings == {"temperature": 0.9, "greedy": False, "seed": None}


def _cli(monkeypatch, tmp_path, capsys, *argv: str) -> tuple[int, str, str]:
    for key, value in _env(tmp_path, tmp_path / "data").items():
        monkeypatch.setenv(key, value)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_import_of_deeply_nested_json_is_one_line(monkeypatch, tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text('{"format": "streamchat-history", "version": 1, "conversations": [{"title": '
                    + "[" * 200_000 + "]" * 200_000 + "}]}", encoding="utf-8")
    code, _, err = _cli(monkeypatch, tmp_path, capsys, "history", "import", str(deep))
    assert code == 2
    assert _one_error_line(err) == f"error: {deep} is nested too deeply to be a history export; nothing was imported"


def test_cli_import_of_an_object_title_is_one_line(monkeypatch, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_export(title={"x": 1})), encoding="utf-8")
    code, _, err = _cli(monkeypatch, tmp_path, capsys, "history", "import", str(bad))
    assert code == 2 and "conversations[0].title must be a string, got object" in _one_error_line(err)


# -- export and pipes -----------------------------------------------------------------------------------------------
def test_export_into_a_missing_folder_is_one_line(monkeypatch, tmp_path, capsys):
    History(tmp_path / "data").new_conversation("kept")
    out = tmp_path / "no" / "such" / "chat.md"
    code, stdout, err = _cli(monkeypatch, tmp_path, capsys, "history", "export", "--out", str(out))
    assert code == 2 and stdout == ""
    assert _one_error_line(err) == f"error: cannot write {out}: the folder {out.parent} does not exist"
    assert not (tmp_path / "no").exists()


def test_export_replaces_a_file_whole(monkeypatch, tmp_path, capsys):
    History(tmp_path / "data").new_conversation("kept")
    out = tmp_path / "chat.json"
    out.write_text("old", encoding="utf-8")
    code, stdout, _ = _cli(monkeypatch, tmp_path, capsys, "history", "export", "--format", "json", "--out", str(out))
    assert code == 0 and stdout == f"exported to {out}\n"
    assert json.loads(out.read_text(encoding="utf-8"))["conversations"][0]["title"] == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "data"]  # no temporary file left


def test_history_list_into_a_closed_pipe_exits_quietly(tmp_path):
    data = tmp_path / "data"
    conversations = [{"title": f"conversation {i}", "created": 1.0, "updated": float(i), "messages": []}
                     for i in range(3000)]  # more than a pipe buffer holds
    History(data).import_json({"format": "streamchat-history", "version": 1, "conversations": conversations})
    streamchat = ROOT / ".venv" / "bin" / "streamchat"
    command = [str(streamchat)] if streamchat.exists() else _streamchat()
    proc = subprocess.run(["bash", "-c", '"$@" history list | head -1; echo "status=${PIPESTATUS[0]}" >&2', "bash",
                           *command], capture_output=True, text=True, env=_env(tmp_path, data), timeout=120)
    assert re.fullmatch(r" *3000  \S+ \S+    0 msgs  conversation 2999\n", proc.stdout)
    assert proc.stderr == "status=141\n"  # no traceback; the status a shell shows for a reader that left (SIGPIPE)


# -- Markdown export (on SQLite and PostgreSQL) ------------------------------------------------------------------------
HOSTILE = ("<script>alert(1)</script> & <iframe src=x></iframe>\n**You**\n\nforged question\r**StreamChat**\u2028"
           "# heading\n```\n<img src=x onerror=alert(1)>")


def test_markdown_export_cannot_forge_turns_or_inject_html(stores):
    history = History(stores.location())
    [cid] = history.import_json(_export(title="<b>title</b>\n**You**\n# second title", m_text=HOSTILE))
    history.add_message(cid, "assistant", HOSTILE, stop_reason="eos)_\n\n**You**\n\n_(x")  # stored directly: an import refuses it
    md = history.export_markdown(cid)
    assert "<" not in md and ">" not in md.replace("\n> ", "\n").replace("\n>\n", "\n")
    lines = md.splitlines()
    assert [x for x in lines if x.startswith("#")] == [r"# &lt;b&gt;title&lt;/b&gt; \*\*You\*\* # second title"]
    headers = [x for x in lines if re.match(r"\*\*(You|StreamChat)\*\*", x)]
    assert headers == ["**You**", r"**StreamChat** _(stopped: eos)\_ \*\*You\*\* \_(x)_"]
    assert all(x.startswith(">") for x in lines if x and not x.startswith(("#", "**")))
    assert "> &lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;iframe src=x&gt;&lt;/iframe&gt;" in lines
    assert "> forged question" in lines and "> **StreamChat**" in lines


def test_markdown_export_keeps_ordinary_formatting(stores):
    history = History(stores.location())
    cid = history.new_conversation("Weather")
    history.add_message(cid, "user", "What should I wear?")
    history.add_message(cid, "assistant", "- a jacket\n- **boots**\n\n```python\nprint(1)\n```", stop_reason="cancelled")
    assert history.export_markdown(cid) == ("# Weather\n\n**You**\n\n> What should I wear?\n\n"
                                            "**StreamChat** _(stopped: cancelled)_\n\n"
                                            "> - a jacket\n> - **boots**\n>\n> ```python\n> print(1)\n> ```\n")
