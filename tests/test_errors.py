"""One error path: every failure is one line on stderr (exit 2 for bad input and too little memory, 1 for a bug whose
traceback lands in a crash log); the window shows the line in a dialog."""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import crash
from appliance.errors import BundleError
from streamchat import cli

ROOT = Path(__file__).resolve().parents[1]


def _limited(megabytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))
    return apply


@pytest.mark.parametrize("megabytes", [100, 200])
def test_too_small_address_space_is_one_line(tmp_path, megabytes):
    env = {**os.environ, "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache"), "STREAMCHAT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "-m", "streamchat", "generate", "--demo", "--prompt", "hi"], cwd=ROOT, env=env,
                          capture_output=True, text=True, preexec_fn=_limited(megabytes), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: not enough memory: StreamChat needs at least 256 MB of address space to start, this process is limited "
        f"to {megabytes} MB (ulimit -v)"]
    assert not (tmp_path / "data").exists()  # refused before touching anything


def test_cli_imports_no_runtime_before_a_command_runs():
    code = "import sys, streamchat.cli; print(sorted(m for m in ('numpy', 'onnxruntime', 'sentencepiece') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_failure_from_memory_is_reported_as_memory():
    exc = ImportError("/x/numpy/_core.so: failed to map segment from shared object")
    assert crash.expected(exc)
    assert crash.one_line(exc, "starting").startswith("not enough memory while starting: ")


def test_bug_is_one_line_with_a_crash_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_verify", broken)
    assert cli.main(["verify", str(tmp_path)]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    logs = list((tmp_path / "cache" / "crashes").glob("crash-*.txt"))
    assert len(logs) == 1
    assert err.splitlines() == [f"error: unexpected error while running `streamchat verify` (RuntimeError: boom second "
                                f"line); the details are in {logs[0]}"]
    text = logs[0].read_text(encoding="utf-8")
    assert "Traceback" in text and 'raise RuntimeError("boom\\nsecond line")' in text and "verify" in text


def test_bug_without_a_writable_cache_still_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "cmd_verify", lambda args: {}["missing"])
    assert cli.main(["verify", str(tmp_path)]) == cli.EXIT_BUG
    assert capsys.readouterr().err.splitlines() == [
        "error: unexpected error while running `streamchat verify` (KeyError: 'missing'); no crash log could be written"]


def test_streamchat_errors_are_exit_2_and_one_line(tmp_path, monkeypatch, capsys):
    def refuse(args):
        raise BundleError("bundle checksum mismatch in a.onnx:\n re-copy it")

    monkeypatch.setattr(cli, "cmd_verify", refuse)
    assert cli.main(["verify", str(tmp_path)]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.splitlines() == ["error: bundle checksum mismatch in a.onnx: re-copy it"]


def test_memory_error_is_exit_2(monkeypatch, capsys):
    def exhaust(args):
        raise MemoryError()

    monkeypatch.setattr(cli, "cmd_verify", exhaust)
    assert cli.main(["verify", "x"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.splitlines()[0].startswith("error: not enough memory while running `streamchat verify`")


def test_untrusted_text_reaches_the_terminal_without_control_characters(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "data"))
    hostile = "title\x1b]0;owned\x07\r\x1b[2Jend"
    export = {"format": "streamchat-history", "version": 1, "conversations": [
        {"title": hostile, "created": 1.0, "updated": 2.0, "messages": [
            {"role": "user", "text": f"q {hostile}", "created": 1.0}]}]}
    (tmp_path / "h.json").write_text(json.dumps(export), encoding="utf-8")
    assert cli.main(["history", "import", str(tmp_path / "h.json")]) == 0
    for argv in (["history", "list"], ["history", "show", "1"], ["history", "search", "title"]):
        capsys.readouterr()
        assert cli.main(argv) == 0
        out = capsys.readouterr().out.replace("\\]", "]")  # `show` prints Markdown, where brackets are escaped
        assert "title\ufffd]0;owned\ufffd" in out and not any(c in out for c in "\x1b\x07\r"), (argv, out)


def test_error_lines_carry_no_control_characters(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_verify", lambda args: (_ for _ in ()).throw(BundleError("bad \x1b[31mname\r")))
    assert cli.main(["verify", "x"]) == 2
    assert capsys.readouterr().err == "error: bad \ufffd[31mname\n"


@pytest.mark.parametrize("argv", [["history", "show", "99999999999999999999"], ["history", "export", "0", "--out", "x"],
                                  ["history", "delete", "-3"], ["history", "show", "abc"]])
def test_conversation_ids_outside_what_sqlite_holds_are_usage_errors(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    command = f"streamchat history {argv[1]}"
    assert capsys.readouterr().err.splitlines() == [
        f"error: {command}: argument id: a conversation id is a whole number from 1 to {2**63 - 1}, got {argv[2]!r} "
        f"(see {command} --help)"]


def test_history_search_with_undecodable_bytes_is_answered(tmp_path):
    env = {**os.environ, "STREAMCHAT_DATA_DIR": str(tmp_path / "data")}
    typed = b"bad \xff".decode("utf-8", "surrogateescape")  # how Python hands an undecodable argv to the program
    proc = subprocess.run([sys.executable, "-m", "streamchat", "history", "search", typed], cwd=ROOT, env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.decode() == "no stored message contains 'bad \ufffd'\n"


def test_history_list_shows_a_stored_time_out_of_range(tmp_path, monkeypatch, capsys):
    import sqlite3

    from appliance.history import History

    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "data"))
    history = History(tmp_path / "data")
    history.new_conversation("from an older import")
    history.close()
    with sqlite3.connect(tmp_path / "data" / "history.sqlite3") as conn:  # as an import before times were bounded wrote
        conn.execute("UPDATE conversations SET updated = 1e308")
    assert cli.main(["history", "list"]) == 0
    assert "????-??-?? ??:??" in capsys.readouterr().out
