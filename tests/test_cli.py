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


def test_chat_session_over_stdin():
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "streamchat", "chat", "--checkpoint", str(TINY), "--greedy",
                           "--max-new-tokens", "24", "--repetition-penalty", "1.0"],
                          input="你好，请介绍一下你自己。\n/clear\n/exit\n", capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert GOLDEN["prompts"][0]["greedy"]["rp1.0"]["response"] in proc.stdout
    assert "(history cleared)" in proc.stdout


def test_every_command_has_help():
    for command in ([], ["generate"], ["chat"]):
        proc = subprocess.run([sys.executable, "-m", "streamchat", *command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: streamchat" in proc.stdout
