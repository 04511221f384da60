"""`generate`, `chat` and `serve` open a bundle on the saved engine, device and NPU number (the settings the window
uses) unless the command line gives them."""

import json
import os
import socket
import subprocess
import sys

import pytest

from appliance.settings import Settings
from streamchat.cli import _engine_placement, build_parser, main


def _save(app_dirs, **values) -> None:
    (app_dirs / "config").mkdir(exist_ok=True)
    (app_dirs / "config" / "settings.json").write_text(json.dumps(values), encoding="utf-8")


@pytest.mark.parametrize("command", [["generate", "--bundle", "B", "--prompt", "p"], ["chat", "--bundle", "B"],
                                     ["serve", "--bundle", "B"]])
def test_the_flags_default_to_the_saved_settings(command):
    saved = Settings()
    saved.engine, saved.device, saved.device_id = "mindspore", "ascend", 3
    parse = build_parser().parse_args
    assert _engine_placement(parse(command), saved) == {"engine": "mindspore", "device": "ascend", "device_id": 3,
                                                        "weights": None}
    given = parse([*command, "--engine", "onnxruntime", "--device", "cpu", "--device-id", "0"])
    assert _engine_placement(given, saved) == {"engine": "onnxruntime", "device": "cpu", "device_id": 0,
                                               "weights": None}
    assert _engine_placement(parse(command), Settings()) == {"engine": "auto", "device": "cpu", "device_id": 0,
                                                             "weights": None}


def test_generate_and_chat_open_the_bundle_on_the_saved_engine(tiny, app_dirs, capsys):
    _save(app_dirs, engine="acl")  # an engine the cpu bundle cannot run: the one line names it
    for argv in (["generate", "--bundle", str(tiny), "--prompt", "你好"], ["chat", "--bundle", str(tiny)]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: {tiny} targets cpu; it cannot run on engine acl (engines for it: " \
                                          "onnxruntime)\n"
    assert main(["generate", "--bundle", str(tiny), "--prompt", "你好", "--max-new-tokens", "4", "--json",
                 "--engine", "onnxruntime"]) == 0  # the flag wins for this run
    assert json.loads(capsys.readouterr().out)["timings"]["tokens"] > 0

    _save(app_dirs, device="ascend")
    assert main(["generate", "--bundle", str(tiny), "--prompt", "你好"]) == 2
    assert "engine onnxruntime runs on cpu, not on ascend" in capsys.readouterr().err
    assert main(["generate", "--bundle", str(tiny), "--prompt", "你好", "--max-new-tokens", "4", "--device", "cpu"]) == 0


def test_serve_opens_its_replicas_on_the_saved_engine(tiny, app_dirs):
    _save(app_dirs, engine="acl")
    env = {**os.environ, "STREAMCHAT_CONFIG_DIR": str(app_dirs / "config"), "STREAMCHAT_DATA_DIR": str(app_dirs / "data")}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "streamchat", "serve", "--bundle", str(tiny), "--port", str(port)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == f"error: {tiny} targets cpu; it cannot run on engine acl (engines " \
                                                  "for it: onnxruntime)"
