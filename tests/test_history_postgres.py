"""The PostgreSQL history beyond the shared suite: what goes wrong with a server (one line each, never the password),
servers that start together on a new database, and two ``streamchat serve`` processes on one database continuing each
other's conversations (the multi-server deployment of docs/service.md)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.history import History, HistoryError
from tests.ports import free_port
from tests.postgres_server import PASSWORD, USER

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    return {**{k: v for k, v in os.environ.items() if k != "STREAMCHAT_HISTORY_URL"},
            "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"), "STREAMCHAT_DATA_DIR": str(tmp_path / "data"),
            "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONIOENCODING": "utf-8"}


def _cli(tmp_path: Path, *args: str, code: str = "") -> subprocess.CompletedProcess:
    """``streamchat ARGS`` in a new process (``code`` runs first, e.g. to hide the driver)."""
    script = f"import sys\n{code}\nfrom streamchat.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                          env=_env(tmp_path), timeout=120)


def _one_line(run: subprocess.CompletedProcess) -> str:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (run.returncode, run.stderr)
    assert PASSWORD not in run.stderr and PASSWORD not in run.stdout
    return lines[0]


@pytest.fixture
def url(postgres):
    made = postgres.create_database()
    yield made
    postgres.drop_database(made)


def test_bad_connections_are_one_line_without_the_password(postgres, url, tmp_path):
    where = f"postgresql://{USER}@127.0.0.1:{postgres.port}"
    wrong = url.replace("s3cret", "wrong-secret")
    assert _one_line(_cli(tmp_path, "history", "list", "--history-url", wrong)) == (
        f'error: {where}/{url.rsplit("/", 1)[1]} refused the login of user {USER} (password authentication failed '
        f'for user "{USER}"): the history cannot be opened; check the user and password (in the URL, $PGPASSWORD or '
        "~/.pgpass) and try again")
    missing = url.rsplit("/", 1)[0] + "/no_such_database"
    assert _one_line(_cli(tmp_path, "history", "list", "--history-url", missing)) == (
        f"error: the database no_such_database does not exist on {where}/no_such_database: the history cannot be opened; "
        f"create it (createdb -O {USER} no_such_database) and try again")
    closed = url.replace(f":{postgres.port}/", f":{free_port()}/")
    line = _one_line(_cli(tmp_path, "history", "list", "--history-url", closed))
    assert line.startswith("error: cannot reach the PostgreSQL server of postgresql://streamchat@127.0.0.1:")
    assert line.endswith("(Connection refused): the history cannot be opened; check that it runs and that this machine "
                         "may connect to it and try again")


@pytest.mark.parametrize("bad, expected, parsed_by_libpq", [
    ("postgresql://streamchat:s3cret%3Apass%40word%2F%25@[::1:5/x", "the history URL is not a valid URL", False),
    ("postgresql://streamchat:s3cret\uff1ax@host/x", "the history URL is not a valid URL (netloc '***@host' contains",
     False),
    ("postgresql://streamchat:s3cret%3Apass%40word%2F%25@host:port/x", "the history URL's port is not a number", False),
    pytest.param("postgresql://streamchat:s3cret%3Apass%40word%2F%25@host/x?colour=blue",
                 'the history URL is not a valid PostgreSQL URL (invalid URI query parameter: "colour")', True,
                 marks=pytest.mark.skipif(importlib.util.find_spec("psycopg") is None,
                                          reason="libpq's URL checks come with the psycopg driver (not installed)")),
    ("mysql://streamchat:s3cret%3Apass%40word%2F%25@host/x", "the history URL must start with postgresql:// (got mysql://)",
     False),
])
def test_a_bad_url_is_one_line_without_the_password(tmp_path, bad, expected, parsed_by_libpq):
    """The URL's own form is checked before the driver is needed: the cases libpq does not parse give the same line
    with the driver hidden. A password with a full-width colon (typed through a CJK input method) makes urlsplit
    quote the user info: it is masked there too."""
    if not parsed_by_libpq:
        hidden = _one_line(_cli(tmp_path, "history", "list", "--history-url", bad, code="sys.modules['psycopg'] = None"))
        assert hidden.startswith(f"error: {expected}") and "s3cret" not in hidden
    line = _one_line(_cli(tmp_path, "history", "list", "--history-url", bad))
    assert line.startswith(f"error: {expected}") and "s3cret" not in line


def test_without_the_driver_a_url_is_one_line(url, tmp_path):
    run = _cli(tmp_path, "serve", "--demo", "--port", str(free_port()), "--history-url", url,
               code="sys.modules['psycopg'] = None  # as if streamchat[postgres] were not installed")
    assert _one_line(run) == ("error: a postgresql:// history needs the psycopg driver: pip install "
                              "'streamchat[postgres]'")
    assert _cli(tmp_path, "history", "list", code="sys.modules['psycopg'] = None").returncode == 0  # SQLite needs none


def test_a_database_of_other_tables_is_refused_and_kept(postgres, url):
    postgres.admin(f"CREATE TABLE conversations (id int); ALTER TABLE conversations OWNER TO {USER}",
                   url.rsplit("/", 1)[1])
    with pytest.raises(HistoryError) as err:
        History(url)
    assert "holds tables StreamChat did not create (relation \"conversations\" already exists)" in str(err.value)
    assert postgres.admin("SELECT to_regclass('streamchat_schema')::text", url.rsplit("/", 1)[1]) == [(None,)]


def test_a_session_the_server_ended_is_replaced_before_the_next_call(postgres, url):
    """A restart or an administrator ends the idle session: the next call opens a new one instead of failing (the
    message is stored once); the lost connection's own line is the unreachable server's (tested above)."""
    history = History(url)
    cid = history.new_conversation("kept")
    postgres.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'streamchat'")
    history.add_message(cid, "user", "after the server ended the session")
    assert [m.text for m in history.messages(cid)] == ["after the server ended the session"]


def test_servers_starting_together_migrate_a_new_database_once(url):
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            History(url).new_conversation("opened")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(History(url).conversations()) == 6


# -- two servers, one database -------------------------------------------------------------------------------------
class _Server:
    """``streamchat serve --demo`` on a free port with its history in ``url``."""

    def __init__(self, root: Path, url: str) -> None:
        import httpx

        self.port = free_port()
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws/chat"
        env = {**_env(root), "STREAMCHAT_HISTORY_URL": url}  # the password stays out of the process list
        self.process = subprocess.Popen([sys.executable, "-m", "streamchat", "serve", "--demo", "--port", str(self.port)],
                                        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not become ready")

    def turn(self, text: str, conversation_id: int | None) -> tuple[str, dict]:
        """One WebSocket message; the joined deltas and the done frame."""
        import websockets

        async def talk() -> tuple[str, dict]:
            async with websockets.connect(self.ws_url) as ws:
                frame = {"text": text, "greedy": True, "max_new_tokens": 48}
                await ws.send(json.dumps(frame if conversation_id is None else {**frame, "conversation_id": conversation_id}))
                deltas = []
                while (reply := json.loads(await ws.recv()))["type"] == "delta":
                    deltas.append(reply["text"])
                assert reply["type"] == "done", reply
                return "".join(deltas), reply

        return asyncio.run(talk())

    def stop(self) -> str:
        self.process.terminate()
        return self.process.communicate(timeout=60)[1]


def _generate(root: Path, prompt: str, turns: list[tuple[str, str]]) -> str:
    """``streamchat generate``'s greedy answer to ``prompt`` after ``turns`` (no server, no database)."""
    history = root / f"turns-{len(turns)}.json"
    history.write_text(json.dumps(turns, ensure_ascii=False), encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "streamchat", "generate", "--demo", "--json", "--greedy", "--max-new-tokens",
                          "48", "--prompt", prompt, "--history", str(history)], env=_env(root), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)["response"]


def test_two_servers_on_one_database_continue_each_others_conversations(url, tmp_path):
    pytest.importorskip("websockets")
    questions = ["StreamChat 是什么？", "它需要联网吗？", "How do I start it?"]
    a = _Server(tmp_path / "a", url)
    try:
        b = _Server(tmp_path / "b", url)
        try:
            first, done = a.turn(questions[0], None)
            cid = done["conversation_id"]
            second, done_b = b.turn(questions[1], cid)  # server B has never seen this conversation but in the database
            third, done_a = a.turn(questions[2], cid)
        finally:
            err_b = b.stop()
    finally:
        err_a = a.stop()
    assert done_b["conversation_id"] == done_a["conversation_id"] == cid
    stored = History(url).messages(cid)
    assert [(m.role, m.text) for m in stored] == [("user", questions[0]), ("assistant", first), ("user", questions[1]),
                                                  ("assistant", second), ("user", questions[2]), ("assistant", third)]
    # each server's prompt held the other's turns: its greedy answers are generate's with the same history
    assert second == _generate(tmp_path, questions[1], [(questions[0], first)])
    assert third == _generate(tmp_path, questions[2], [(questions[0], first), (questions[1], second)])
    assert third != _generate(tmp_path, questions[2], [])  # and that history changes the answer
    assert PASSWORD not in err_a + err_b


def test_a_turn_whose_connection_was_dropped_is_stored_and_answered(postgres, url, tmp_path):
    """The server's database connection is cut between two turns: the turn still ends in ``done`` and both of its
    messages are in the history (the history reconnects; nothing is reported lost that was saved)."""
    pytest.importorskip("websockets")
    server = _Server(tmp_path / "a", url)
    try:
        first, done = server.turn("StreamChat 是什么？", None)
        cid = done["conversation_id"]
        postgres.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'streamchat'")
        second, done = server.turn("它需要联网吗？", cid)
    finally:
        err = server.stop()
    assert done["conversation_id"] == cid and done["stop_reason"] in {"eos", "length"}, done
    stored = History(url).messages(cid)
    assert [(m.role, m.text) for m in stored][2:] == [("user", "它需要联网吗？"), ("assistant", second)]
    assert PASSWORD not in err
