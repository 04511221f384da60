"""`streamchat history` as a shell user meets it: a reader that leaves early, a search that finds nothing, the same
export imported twice; and titles made from a first message that has several lines. Each test runs on SQLite in the data
folder and on a PostgreSQL database given by $STREAMCHAT_HISTORY_URL (the ``stores`` fixture)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.history import History
from streamchat.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def data(tmp_path, monkeypatch, stores):
    """Where ``streamchat history`` finds its history: the data folder, or a database."""
    for name in ("CONFIG", "DATA", "CACHE"):
        monkeypatch.setenv(f"STREAMCHAT_{name}_DIR", str(tmp_path / name.lower()))
    location = stores.location()
    stores.use(monkeypatch, location)
    return location


def _stored(data: Path, count: int) -> History:
    history = History(data)
    for i in range(count):
        cid = history.new_conversation()
        history.add_message(cid, "user", f"question {i}\nwith a second line")
        history.add_message(cid, "assistant", f"answer {i}")
    return history


@pytest.mark.parametrize("action", [["list"], ["show", "1"], ["search", "question"]])
def test_a_reader_that_left_ends_the_command_quietly(data, action):
    """`streamchat history list | head`: the reader may be gone before the first write (a short list is written at
    exit, from Python's buffer); no BrokenPipeError message, the status a shell reports for SIGPIPE."""
    _stored(data, 3)
    read, write = os.pipe()
    os.close(read)  # the reader is gone
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the buffered stdout a user's shell has
    run = subprocess.run([sys.executable, "-m", "streamchat", "history", *action], cwd=REPO, env=env, stdout=write,
                         stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert (run.returncode, run.stderr) == (141, "")


def test_a_search_without_a_match_says_so(data, capsys):
    _stored(data, 1)
    assert main(["history", "search", "nothing like this"]) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "no stored message contains 'nothing like this'\n")
    assert main(["history", "search", "question"]) == 0
    assert capsys.readouterr().out == "[1] user: question 0 with a second line\n"


def test_importing_the_same_export_twice_adds_nothing_the_second_time(data, tmp_path, capsys, monkeypatch, stores):
    history = _stored(data, 2)
    export = tmp_path / "all.json"
    assert main(["history", "export", "--format", "json", "--out", str(export)]) == 0
    assert main(["history", "import", str(export)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "imported 0 conversation(s); skipped 2 already in the history"
    assert len(history.conversations()) == 2

    elsewhere = stores.location("elsewhere")
    History(elsewhere).close()
    stores.use(monkeypatch, elsewhere)
    assert main(["history", "import", str(export)]) == 0
    assert main(["history", "import", str(export)]) == 0
    assert capsys.readouterr().out.splitlines() == ["imported 2 conversation(s)",
                                                    "imported 0 conversation(s); skipped 2 already in the history"]
    assert len(History(elsewhere).conversations()) == 2


def test_a_conversation_that_differs_is_imported(data, stores):
    """Only the very same conversation is skipped: one renamed, continued after the export, or with the same
    messages at other times, is imported."""
    history = _stored(data, 1)
    document = history.export_json()
    [conversation] = document["conversations"]
    assert history.import_json(document) == []
    renamed = json.loads(json.dumps(document))
    renamed["conversations"][0]["title"] = "renamed"
    longer = json.loads(json.dumps(document))
    longer["conversations"][0]["messages"].append({**conversation["messages"][0], "created": 2e9})
    later = json.loads(json.dumps(document))
    later["conversations"][0]["messages"][1]["created"] += 1
    added = history.import_json(renamed) + history.import_json(longer) + history.import_json(later)
    assert len(added) == 3 and len(history.conversations()) == 4
    twice = {**document, "conversations": [conversation, conversation]}
    assert len(History(stores.location("fresh")).import_json(twice)) == 1  # a document holding it twice adds it once


def test_a_first_message_of_several_lines_makes_a_one_line_title(data, capsys):
    _stored(data, 1)
    assert main(["history", "list"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("2 msgs  question 0 with a second line")
    assert History(data).conversation(1).title == "question 0 with a second line"
