"""The streamchat command on the golden checkpoint: exact ids and text, clean errors."""

import json
import os
import subprocess
import sys

import pytest

from streamchat.cli import main
from tests.conftest import GOLDEN, TINY


def _generate_json(capsys, prompt, rp, tmp_path, extra=()):
    argv = ["generate", "--checkpoint", str(TINY), "--prompt", prompt["query"], "--greedy", "--max-new-tokens", "24",
            "--repetition-penalty", rp, "--json", *extra]
    if prompt["history"]:
        history = tmp_path / "history.json"
        history.write_text(json.dumps(prompt["history"], ensure_ascii=False), encoding="utf-8")
        argv += ["--history", str(history)]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("rp", ["1.0", "1.2"])
@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=lambda p: p["name"])
def test_generate_json_reproduces_fixture(capsys, tmp_path, prompt, rp):
    out = _generate_json(capsys, prompt, rp, tmp_path)
    expected = prompt["greedy"][f"rp{rp}"]
    assert out["prompt_ids"] == prompt["prompt_input_ids"]
    assert out["token_ids"] == expected["new_token_ids"]
    assert out["response"] == expected["response"]
    assert "".join(out["deltas"]) == out["response"]
    assert out["stopped"] == ("eos" if expected["stopped_on_eos"] else "max_new_tokens")
    assert out["timings"]["prefill_ms"] > 0 and out["timings"]["decode_ms_per_token"] > 0


def test_generate_streams_plain_text(capsys):
    prompt = GOLDEN["prompts"][3]
    assert main(["generate", "--checkpoint", str(TINY), "--prompt", prompt["query"], "--greedy",
                 "--max-new-tokens", "24", "--repetition-penalty", "1.0"]) == 0
    assert capsys.readouterr().out == prompt["greedy"]["rp1.0"]["response"] + "\n"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--checkpoint", "/no/such/dir", "--prompt", "x"], "checkpoint directory not found"),
    (["generate", "--checkpoint", str(TINY), "--prompt", " "], "empty"),
    (["generate", "--checkpoint", str(TINY), "--prompt", "x", "--top-p", "0"], "top_p"),
    (["generate", "--checkpoint", str(TINY), "--prompt", "x", "--history", "/no/file.json"], "cannot read history"),
])
def test_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_history_shape(capsys, tmp_path):
    bad = tmp_path / "h.json"
    bad.write_text('[["only one"]]')
    assert main(["generate", "--checkpoint", str(TINY), "--prompt", "x", "--history", str(bad)]) == 2
    assert "[query, response]" in capsys.readouterr().err


def _chat(tmp_path, stdin, *extra):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"),
           "STREAMCHAT_DATA_DIR": str(tmp_path / "data"), "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "streamchat", *extra], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


def test_chat_keeps_history_across_runs(tmp_path):
    args = ["chat", "--checkpoint", str(TINY), "--greedy", "--max-new-tokens", "24", "--repetition-penalty", "1.0"]
    first = GOLDEN["prompts"][0]
    proc = _chat(tmp_path, f"{first['query']}\n/exit\n", *args)
    assert proc.returncode == 0, proc.stderr
    assert first["greedy"]["rp1.0"]["response"] in proc.stdout
    listed = _chat(tmp_path, "", "history", "list")
    assert "2 msgs" in listed.stdout and first["query"][:10] in listed.stdout
    again = _chat(tmp_path, "/clear\n/exit\n", *args, "--conversation", "1")
    assert again.returncode == 0 and f"> {first['query']}" in again.stdout and "(new conversation)" in again.stdout
    found = _chat(tmp_path, "", "history", "search", "介绍一下")
    assert "[1] user" in found.stdout
    missing = _chat(tmp_path, "", *args, "--conversation", "42")
    assert missing.returncode == 2 and "no conversation 42" in missing.stderr


def test_every_command_has_help():
    for command in ([], ["generate"], ["chat"], ["export"], ["verify"], ["history"], ["history", "export"]):
        proc = subprocess.run([sys.executable, "-m", "streamchat", *command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: streamchat" in proc.stdout


@pytest.mark.parametrize("argv, expected", [
    (["serve", "--port", "abc"], "error: streamchat serve: argument --port: invalid int value: 'abc' "
                                 "(see streamchat serve --help)"),
    (["generate", "--demo"], "error: streamchat generate: the following arguments are required: --prompt "
                             "(see streamchat generate --help)"),
])
def test_a_bad_argument_is_one_line_and_exit_2(argv, expected, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and capsys.readouterr().err.splitlines() == [expected]
