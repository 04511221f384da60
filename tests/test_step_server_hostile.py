"""The MindSpore Lite step server's client against servers that misbehave: real subprocesses, started the way the real
server is (``STREAMCHAT_LITE_PYTHON`` names the program), each a small Python script that breaks the protocol in one
way. Every case must end in one EngineError line within seconds, with the server killed and reaped."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.engines.lite_server import MAX_FRAME, MAX_HEADER, encode_frame, graph_file_name, parse_frame
from appliance.engines.mindspore_lite import SERVER, LiteStepServer
from appliance.errors import BundleError, EngineError
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent
VOCAB = 50
TIMEOUT = 2.0
FAST = 6.0  # seconds a failing call may take: the deadline plus the kill

FAKE = '''#!{python}
import json, os, struct, sys, time
MODE = {mode!r}
with open({pidfile!r}, "w") as fh:
    fh.write(str(os.getpid()))
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

def frame(header, body=b""):
    head = json.dumps(header).encode()
    return struct.pack(">II", 4 + len(head) + len(body), len(head)) + head + body

def send(data):
    stdout.write(data)
    stdout.flush()

def misbehave(op):
    if MODE == "exit":
        sys.exit(3)
    if MODE == "garbage":
        send(b"\\x00garbage!" * 100)
    elif MODE == "partial":
        send(struct.pack(">II", 104, 20) + b'{{"ok": true, "arr')
    elif MODE == "huge":
        send(struct.pack(">II", 1 << 31, 20))
    elif MODE == "bad json":
        send(struct.pack(">II", 4 + 9, 9) + b"{{not json")
    elif MODE == "no arrays list":
        send(frame({{"ok": True}}))
    elif MODE == "neither ok nor error":
        send(frame({{"hello": 1, "arrays": []}}))
    elif MODE == "short frame":
        send(frame({{"ok": True, "arrays": [{{"dtype": "<f4", "shape": [1, {vocab}]}}]}}, b"\\0" * 8))
    elif MODE == "extra bytes":
        send(frame({{"ok": True, "arrays": []}}, b"\\0" * 8))
    elif MODE == "bad dtype":
        send(frame({{"ok": True, "arrays": [{{"dtype": "O", "shape": [1]}}]}}, b"\\0" * 8))
    elif MODE == "missing arrays":
        send(frame({{"ok": True, "arrays": []}}))
    elif MODE == "wrong logits shape":
        send(frame({{"ok": True, "arrays": [{{"dtype": "<f4", "shape": [1, 7]}}]}}, b"\\0" * 28))
    elif MODE == "bad host_bytes":
        send(frame({{"ok": True, "host_bytes": "12", "arrays": [{{"dtype": "<f4", "shape": [1, {vocab}]}}]}},
                   b"\\0" * 4 * {vocab}))
    elif MODE == "int logits":
        send(frame({{"ok": True, "arrays": [{{"dtype": "<i4", "shape": [1, {vocab}]}}]}}, b"\\0" * 4 * {vocab}))
    time.sleep(60)  # hang after misbehaving (also the "hang" mode): only the client's deadline ends this

answered = 0
while True:
    prefix = stdin.read(8)
    if len(prefix) < 8:
        sys.exit(0)
    total, head_len = struct.unpack(">II", prefix)
    request = json.loads(stdin.read(total - 4)[:head_len])
    if request["op"] == "run" and MODE == "warm up, then hang" and answered < 2:  # the load's two warm-up calls
        answered += 1
        send(frame({{"ok": True, "arrays": [{{"dtype": "<f4", "shape": [1, {vocab}]}}]}}, b"\\0" * 4 * {vocab}))
    elif request["op"] == "run" or MODE in {load_modes!r}:
        misbehave(request["op"])
    else:
        send(frame({{"ok": True, "arrays": []}}))
'''
LOAD_MODES = ["exit", "garbage", "partial", "huge", "bad json", "no arrays list", "neither ok nor error", "short frame",
              "extra bytes", "bad dtype", "hang"]
RUN_MODES = ["missing arrays", "wrong logits shape", "int logits", "bad host_bytes"]
EXPECTED = {
    "exit": "step server stopped (exit code 3); your conversation is kept and the next message restarts it",
    "garbage": "sent a bad reply (a frame of 6775154 bytes with a 1650550629-byte header; allowed: a header of 2 to "
               f"{MAX_HEADER} bytes, a frame of at most {MAX_FRAME} bytes) and was stopped",
    "partial": f"did not answer within {TIMEOUT:g} s and was stopped",
    "huge": "sent a bad reply (a frame of 2147483648 bytes with a 20-byte header",
    "bad json": "sent a bad reply (a frame header that is not UTF-8 JSON) and was stopped",
    "no arrays list": 'sent a bad reply (a frame header that is not an object with an "arrays" list)',
    "neither ok nor error": 'sent a bad reply (a reply with neither "ok": true nor "error")',
    "short frame": "sent a bad reply (a frame shorter than its header says (",
    "extra bytes": "sent a bad reply (a frame with 8 bytes after the arrays its header lists)",
    "bad dtype": 'sent a bad reply (an array entry that is not {"dtype": one of <f4, <f2, <i4, <i8, |b1',
    "hang": f"did not answer within {TIMEOUT:g} s and was stopped; send the message again to restart it",
    "missing arrays": f"sent a bad reply (no arrays where float arrays [[1, {VOCAB}]] were asked for)",
    "wrong logits shape": f"sent a bad reply (float32[1, 7] where float arrays [[1, {VOCAB}]] were asked for)",
    "int logits": f"sent a bad reply (int32[1, {VOCAB}] where float arrays [[1, {VOCAB}]] were asked for)",
    "bad host_bytes": 'sent a bad reply (a reply whose "host_bytes" is not a count of bytes)',
}


def fake_server(tmp_path: Path, mode: str, vocab: int = VOCAB) -> tuple[Path, Path]:
    """An executable script standing in for the Lite Python, and the file it writes its pid to."""
    pidfile = tmp_path / "server.pid"
    script = tmp_path / "fake-lite-python"
    script.write_text(FAKE.format(python=sys.executable, mode=mode, pidfile=str(pidfile), vocab=vocab,
                                  load_modes=LOAD_MODES))
    script.chmod(0o755)
    return script, pidfile


def gone(pid: int) -> bool:
    """Killed and reaped: no /proc entry (a zombie would still have one)."""
    return not Path(f"/proc/{pid}").exists()


def decode_inputs() -> dict[str, np.ndarray]:
    return {"input_ids": np.zeros((1, 1), np.int32), "position_ids": np.zeros((1, 2, 1), np.int32)}


@pytest.mark.parametrize("mode", LOAD_MODES + RUN_MODES)
def test_a_misbehaving_server_is_one_error_within_seconds_and_is_killed(tmp_path, monkeypatch, mode):
    script, pidfile = fake_server(tmp_path, mode)
    monkeypatch.setenv("STREAMCHAT_LITE_PYTHON", str(script))
    runner = LiteStepServer({"decode": str(tmp_path / "decode.onnx")}, tmp_path / "cache", VOCAB, timeout=TIMEOUT,
                            load_timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(EngineError) as raised:
        runner.reset()
        runner.run("decode", decode_inputs())
    assert time.monotonic() - started < FAST
    message = str(raised.value)
    assert EXPECTED[mode] in message and "\n" not in message
    assert runner.proc.returncode is not None and gone(int(pidfile.read_text()))


def test_a_server_that_recovers_serves_the_next_sequence(tmp_path, monkeypatch):
    """After a killed server, the next sequence (reset) starts a new one; here a good one, whose logits come back."""
    script, pidfile = fake_server(tmp_path, "hang")
    monkeypatch.setenv("STREAMCHAT_LITE_PYTHON", str(script))
    runner = LiteStepServer({"decode": "decode.onnx"}, tmp_path / "cache", VOCAB, timeout=TIMEOUT, load_timeout=TIMEOUT)
    with pytest.raises(EngineError, match="did not answer"):
        runner.reset()
    first = int(pidfile.read_text())
    good = tmp_path / "good.py"
    good.write_text(f"#!{sys.executable}\n" + GOOD_SERVER)
    good.chmod(0o755)
    monkeypatch.setenv("STREAMCHAT_LITE_PYTHON", str(good))
    runner.reset()
    logits = runner.run("decode", decode_inputs())
    assert logits.shape == (1, VOCAB) and logits.dtype == np.float32 and logits[0, 7] == 7.0
    assert gone(first) and runner.pid != first
    pid = runner.pid
    runner.close()
    assert gone(pid)


GOOD_SERVER = f'''
import sys
sys.path.insert(0, {str(REPO)!r})
import numpy as np
from appliance.engines.lite_server import read_frame, write_frame
while True:
    try:
        request, _ = read_frame(sys.stdin.buffer)
    except EOFError:
        break
    arrays = [np.arange({VOCAB}, dtype=np.float32)[None]] if request["op"] == "run" else []
    write_frame(sys.stdout.buffer, {{"ok": True}}, arrays)
'''


def test_ctrl_c_while_waiting_kills_the_server_and_returns(tmp_path):
    script, pidfile = fake_server(tmp_path, "hang")
    client = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom appliance.engines.mindspore_lite import LiteStepServer\n"
         "runner = LiteStepServer({'decode': 'decode.onnx'}, sys.argv[1], 50)  # the real 600 s deadline\n"
         "try:\n    runner.reset()\nexcept KeyboardInterrupt:\n    print('interrupted', runner.proc.returncode)\n"
         "    sys.exit(130)\n", str(tmp_path / "cache")],
        cwd=REPO, env={**os.environ, "STREAMCHAT_LITE_PYTHON": str(script)}, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.05)
        time.sleep(0.5)  # the client is now waiting for the load reply
        started = time.monotonic()
        client.send_signal(signal.SIGINT)
        out, _ = client.communicate(timeout=10)
    finally:
        client.kill()
    assert time.monotonic() - started < 3
    assert client.returncode == 130 and out.split() == ["interrupted", str(-signal.SIGKILL)]
    assert gone(int(pidfile.read_text()))


def test_missing_or_non_executable_lite_python_is_one_line(tmp_path, monkeypatch):
    runner = LiteStepServer({"decode": "decode.onnx"}, tmp_path, VOCAB)
    monkeypatch.setenv("STREAMCHAT_LITE_PYTHON", "/nonexistent")
    with pytest.raises(EngineError, match=r"^STREAMCHAT_LITE_PYTHON=/nonexistent is not an executable file: set it to a "
                                          r"Python that has the mindspore_lite wheel"):
        runner.reset()
    text = tmp_path / "python3"
    text.write_text("not a program")
    monkeypatch.setenv("STREAMCHAT_LITE_PYTHON", str(text))
    with pytest.raises(EngineError, match=f"STREAMCHAT_LITE_PYTHON={text} is not an executable file"):
        runner.reset()
    text.chmod(0o755)  # executable, but not a program the kernel can run
    with pytest.raises(EngineError, match=f"cannot start the MindSpore Lite step server with {text} \\(Exec format error\\)"):
        runner.reset()


@pytest.mark.parametrize("name", ["../../outside", "/etc/passwd", "decode/../../x", "a" * 33, "prefill:", "..", "",
                                  "décode", "decode\n"])
def test_graph_names_that_are_not_plain_file_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="is not a plain name"):
        graph_file_name(name)
    with pytest.raises(BundleError, match="^this bundle's graph name .* is not a plain name .*: re-export the bundle$"):
        LiteStepServer({name: "x.onnx"}, tmp_path, VOCAB)
    assert list(tmp_path.iterdir()) == []


def test_plain_graph_names_map_to_plain_file_names():
    assert graph_file_name("decode") == "decode" and graph_file_name("prefill:256") == "prefill_256"


def test_an_unknown_lite_device_is_refused(tmp_path):
    with pytest.raises(EngineError, match=r"MindSpore Lite device '\.\./x' is not one of cpu, ascend$"):
        LiteStepServer({"decode": "x.onnx"}, tmp_path, VOCAB, device="../x")


def test_frames_round_trip_and_limits_hold():
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1, 2]], dtype=np.int32)]
    data = encode_frame({"op": "run", "graph": "decode"}, arrays)
    total, head_len = struct.unpack(">II", data[:8])
    header, values = parse_frame(data[8:], head_len)
    assert header["op"] == "run" and total == len(data) - 4
    for sent, got in zip(arrays, values, strict=True):
        np.testing.assert_array_equal(sent, got)
        assert sent.dtype == got.dtype and got.flags.aligned  # MindSpore Lite miscomputes on misaligned inputs


def test_the_real_server_refuses_a_bad_request_and_exits():
    """lite_server.py parses what the client sends with the same checks (this needs no mindspore_lite: the request
    is refused before the runtime is imported)."""
    proc = subprocess.run([sys.executable, str(SERVER)], input=struct.pack(">II", 100, 1 << 20) + b"x" * 96,
                          capture_output=True, timeout=30)
    total, head_len = struct.unpack(">II", proc.stdout[:8])
    reply = json.loads(proc.stdout[8:8 + head_len])
    assert proc.returncode == 0 and reply["error"].startswith("bad request: a frame of 100 bytes with a 1048576-byte header")


LITE = os.environ.get("STREAMCHAT_LITE_PYTHON")


@pytest.mark.skipif(not LITE, reason="no MindSpore Lite Python (set STREAMCHAT_LITE_PYTHON; .ci/run does)")
def test_the_real_server_refuses_a_graph_name_that_is_a_path(tmp_path):
    graph = {"onnx": str(TINY / "config.json"), "config": "", "shape": "input_ids:1,1", "mindir": ""}
    request = encode_frame({"op": "load", "graphs": {"../outside": graph}, "runtime_config": "", "optimize": "general",
                            "cache_dir": str(tmp_path / "cache"), "device": "cpu", "device_id": 0, "threads": 1})
    proc = subprocess.run([LITE, str(SERVER)], input=request, capture_output=True, timeout=120)
    total, head_len = struct.unpack(">II", proc.stdout[:8])
    reply = json.loads(proc.stdout[8:8 + head_len])
    assert reply["error"].startswith("ValueError: graph name '../outside' is not a plain name")
    assert not (tmp_path / "outside.mindir").exists() and not (tmp_path / "cache").exists()


def test_second_ctrl_c_leaves_a_chat_whose_engine_hangs(tmp_path):
    from model_export.export import export_bundle

    bundle = export_bundle(TINY, tmp_path / "edge", target="ascend-310b", quant="int8").bundle
    vocab = json.loads((TINY / "config.json").read_text())["vocab_size"]
    script, pidfile = fake_server(tmp_path, "warm up, then hang", vocab)  # loads, then never answers a question
    env = {**os.environ, "STREAMCHAT_LITE_PYTHON": str(script), "STREAMCHAT_DATA_DIR": str(tmp_path / "data"),
           "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"), "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache")}
    chat = subprocess.Popen([sys.executable, "-m", "streamchat", "chat", "--bundle", str(bundle), "--engine",
                             "mindspore-lite"], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert chat.stdout.readline().startswith("StreamChat on ")  # loaded and warmed up
        chat.stdin.write("hello\n")
        chat.stdin.flush()
        time.sleep(1.0)  # the answer is now waiting on the server's first step
        chat.send_signal(signal.SIGINT)  # stops the answer between tokens: never reached
        time.sleep(0.5)
        started = time.monotonic()
        chat.send_signal(signal.SIGINT)
        _, err = chat.communicate(timeout=10)
    finally:
        chat.kill()
    assert time.monotonic() - started < 3
    assert chat.returncode == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert gone(int(pidfile.read_text()))
    from appliance.history import History

    history = History(tmp_path / "data")
    stored = [(m.role, m.text) for c in history.conversations() for m in history.messages(c.id)]
    assert stored[0] == ("user", "hello") and stored[1:] in ([], [("assistant", "")])  # the question is kept
