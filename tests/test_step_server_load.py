"""Loading static graphs: outputs taken by position (the Ascend graph compiler may rename them) with their count
checked, and the step server's load with its own long deadline and strict progress frames.

Real subprocesses stand in for the Lite Python (as in tests/test_step_server_hostile.py); the fixture's Ascend bundle
runs through onnxruntime here and through the real step server when a Lite Python is available
(STREAMCHAT_LITE_PYTHON), with its outputs renamed to each other's names."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from appliance.bundle import Bundle
from appliance.conversion import static_input_shapes, static_output_names
from appliance.engines.lite_server import graph_inputs
from appliance.engines.mindspore_lite import LOAD_TIMEOUT, LOAD_TIMEOUT_S, LiteStepServer, configured_load_timeout
from appliance.engines.static import OrtGraphRunner, lite_graphs
from appliance.errors import EngineError
from model_export.export import export_bundle
from tests.conftest import TINY
from tests.test_step_server_hostile import FAST, gone

LITE = os.environ.get("STREAMCHAT_LITE_PYTHON")
needs_lite = pytest.mark.skipif(not LITE, reason="no MindSpore Lite Python (set STREAMCHAT_LITE_PYTHON; .ci/run does)")
VOCAB = 50
GRAPHS = {"prefill:4": "prefill_4.onnx", "decode": "decode.onnx"}

FAKE = '''#!{python}
import json, os, struct, sys, time
PLAN = json.loads({plan!r})
with open({pidfile!r}, "w") as fh:
    fh.write(str(os.getpid()))
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

def send(header, body=b""):
    header.setdefault("arrays", [])
    body = body or b"".join(b"\\0" * 4 * (s["shape"] or [1])[0] for s in header["arrays"])
    head = json.dumps(header).encode()
    stdout.write(struct.pack(">II", 4 + len(head) + len(body), len(head)) + head + body)
    stdout.flush()

while True:
    prefix = stdin.read(8)
    if len(prefix) < 8:
        sys.exit(0)
    total, head_len = struct.unpack(">II", prefix)
    op = json.loads(stdin.read(total - 4)[:head_len])["op"]
    plan = PLAN.get(op, {{}})
    for header in plan.get("before", []):
        send(header)
    time.sleep(plan.get("sleep", 0))
    if op == "run":
        send({{"ok": True, "arrays": [{{"dtype": "<f4", "shape": [1, {vocab}]}}]}},
             b"".join(struct.pack("<f", i) for i in range({vocab})))
    else:
        send({{"ok": True}})
'''


def fake_server(tmp_path: Path, plan: dict) -> tuple[Path, Path]:
    """An executable script standing in for the Lite Python: per op, the frames it sends before its reply and the
    seconds it then waits."""
    pidfile, script = tmp_path / "server.pid", tmp_path / "fake-lite-python"
    script.write_text(FAKE.format(python=sys.executable, plan=json.dumps(plan), pidfile=str(pidfile), vocab=VOCAB))
    script.chmod(0o755)
    return script, pidfile


def progress(stage: str, graph: str) -> dict:
    return {"op": "progress", "stage": stage, "graph": graph}


def decode_inputs() -> dict[str, np.ndarray]:
    return {"input_ids": np.zeros((1, 1), np.int32), "position_ids": np.zeros((1, 2, 1), np.int32)}


def test_progress_frames_reach_the_callback_and_the_load_goes_on(tmp_path, monkeypatch):
    steps = [progress(s, g) for g in GRAPHS for s in ("converting", "building")]
    script, pidfile = fake_server(tmp_path, {"load": {"before": steps}})
    monkeypatch.setenv("STREAMCHAT_LITE_PYTHON", str(script))
    heard: list[str] = []
    runner = LiteStepServer(GRAPHS, tmp_path / "cache", VOCAB, timeout=2, load_timeout=10, progress=heard.append)
    runner.reset()
    assert heard == ["MindSpore Lite: converting prefill:4 (graph 1 of 2)", "MindSpore Lite: building prefill:4 (graph 1 of 2)",
                     "MindSpore Lite: converting decode (graph 2 of 2)", "MindSpore Lite: building decode (graph 2 of 2)"]
    np.testing.assert_array_equal(runner.run("decode", decode_inputs()), np.arange(VOCAB, dtype=np.float32)[None])
    pid = runner.pid
    runner.close()
    assert gone(pid)


def test_the_load_has_its_own_deadline_separate_from_a_step(tmp_path, monkeypatch):
    """A load slower than the step deadline finishes; a step slower than it is stopped; a load slower than its own
    deadline is stopped with the setting to raise named."""
    script, pidfile = fake_server(tmp_path, {"load": {"before": [progress("building", "decode")], "sleep": 1.5},
                                             "run": {"sleep": 1.5}})
    monkeypatch.setenv("STREAMCHAT_LITE_PYTHON", str(script))
    runner = LiteStepServer({"decode": "decode.onnx"}, tmp_path / "cache", VOCAB, timeout=0.5, load_timeout=10)
    runner.reset()
    started = time.monotonic()
    with pytest.raises(EngineError) as raised:
        runner.run("decode", decode_inputs())
    assert time.monotonic() - started < FAST and gone(int(pidfile.read_text()))
    assert str(raised.value) == ("the MindSpore Lite step server did not answer within 0.5 s and was stopped; send the "
                                 "message again to restart it")
    runner = LiteStepServer({"decode": "decode.onnx"}, tmp_path / "cache", VOCAB, timeout=10, load_timeout=0.5)
    with pytest.raises(EngineError) as raised:
        runner.reset()
    assert gone(int(pidfile.read_text()))
    assert str(raised.value) == ("the MindSpore Lite step server did not answer within 0.5 s and was stopped; send the "
                                 f"message again to restart it (loading converts and compiles every graph: raise {LOAD_TIMEOUT})")


BAD_PROGRESS = {
    "unknown op": ({"load": {"before": [{"op": "hello"}]}}, "a frame with the unknown op 'hello'"),
    "unknown stage": ({"load": {"before": [progress("baking", "decode")]}}, "a progress frame that is not"),
    "unknown graph": ({"load": {"before": [progress("building", "prefill:9")]}}, "a progress frame that is not"),
    "graph not a string": ({"load": {"before": [progress("building", 5)]}}, "a progress frame that is not"),
    "extra key": ({"load": {"before": [{**progress("building", "decode"), "x": 1}]}}, "a progress frame that is not"),
    "no graph": ({"load": {"before": [{"op": "progress", "stage": "building"}]}}, "a progress frame that is not"),
    "with arrays": ({"load": {"before": [{**progress("building", "decode"), "arrays": [{"dtype": "<f4", "shape": [1]}]}]}},
                    "a progress frame that is not"),
    "repeated": ({"load": {"before": [progress("building", "decode")] * 2}}, "a second progress frame for building decode"),
    "while running": ({"run": {"before": [progress("building", "decode")]}}, "a progress frame in reply to a run request"),
}


@pytest.mark.parametrize("case", BAD_PROGRESS)
def test_a_bad_progress_frame_is_a_protocol_error(tmp_path, monkeypatch, case):
    plan, expected = BAD_PROGRESS[case]
    script, pidfile = fake_server(tmp_path, plan)
    monkeypatch.setenv("STREAMCHAT_LITE_PYTHON", str(script))
    heard: list[str] = []
    runner = LiteStepServer({"decode": "decode.onnx"}, tmp_path / "cache", VOCAB, timeout=2, load_timeout=2,
                            progress=heard.append)
    started = time.monotonic()
    with pytest.raises(EngineError) as raised:
        runner.reset()
        runner.run("decode", decode_inputs())
    message = str(raised.value)
    assert message.startswith(f"the MindSpore Lite step server sent a bad reply ({expected}") and "\n" not in message
    assert message.endswith("and was stopped; send the message again to restart it")
    assert time.monotonic() - started < FAST and gone(int(pidfile.read_text()))
    assert heard == (["MindSpore Lite: building decode (graph 1 of 1)"] if case == "repeated" else [])


def test_the_load_timeout_setting(monkeypatch):
    monkeypatch.delenv(LOAD_TIMEOUT, raising=False)
    assert configured_load_timeout() == LOAD_TIMEOUT_S == 4 * 3600
    monkeypatch.setenv(LOAD_TIMEOUT, "86400")
    assert configured_load_timeout() == 86400.0
    for bad in ("abc", "0", "-5", "nan", "inf", "1e9", ""):
        monkeypatch.setenv(LOAD_TIMEOUT, bad)
        with pytest.raises(EngineError, match=f"^{LOAD_TIMEOUT}='{bad}' is not a number of seconds from 10 to 604800$"):
            configured_load_timeout()


# -- outputs by position -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return Bundle.open(export_bundle(TINY, tmp_path_factory.mktemp("ascend") / "b", target="ascend-310b",
                                     quant="fp32").bundle)


def check_graphs(bundle: Bundle) -> dict[str, Path]:
    return {key: bundle.path / rel for key, rel in bundle.manifest["graphs"]["check"].items()}


def test_every_static_graph_has_the_stated_output_order(bundle):
    """Logits, then each layer's present key and value: the decode step's past_* inputs in the same order."""
    cfg, graphs = bundle.config, bundle.manifest["graphs"]
    names = static_output_names(cfg)
    assert len(names) == 1 + 2 * cfg.num_layers and names[:3] == ["logits", "present_key.0", "present_value.0"]
    for kind in ("check", "device"):
        for rel in graphs[kind].values():
            assert [o.name for o in onnx.load(bundle.path / rel, load_external_data=False).graph.output] == names
    past = [n for n in static_input_shapes(cfg, graphs["capacity"], None, 1) if n.startswith("past_")]
    assert past == [n.replace("present_", "past_") for n in names[1:]]


def renamed(files: dict[str, Path], out: Path, drop_last: str | None = None) -> dict[str, str]:
    """Copies of the graphs whose outputs carry each other's names (the last output's name on the first, ...), as a
    graph compiler that renames outputs would leave them; ``drop_last`` also removes that graph's last output."""
    out.mkdir()
    copies = {}
    for key, path in files.items():
        model = onnx.load(path, load_external_data=False)
        names = [o.name for o in model.graph.output]
        rename = dict(zip(names, reversed(names), strict=True))
        for node in model.graph.node:
            node.input[:] = [rename.get(n, n) for n in node.input]
            node.output[:] = [rename.get(n, n) for n in node.output]
        for info in (*model.graph.output, *model.graph.value_info):
            info.name = rename.get(info.name, info.name)
        if key == drop_last:
            model.graph.output.pop()
        onnx.save(model, out / path.name)
        copies[key] = str(out / path.name)
    for data in path.parent.glob("*.onnx.data"):  # the weights the graphs share
        shutil.copy(data, out / data.name)
    return copies


def lite_specs(bundle: Bundle, files: dict[str, str]) -> dict[str, dict[str, str]]:
    """What the engine gives the step server for the bundle's check graphs, with ``files`` as their ONNX files."""
    return {key: {**spec, "onnx": files[key]} for key, spec in lite_graphs(bundle, "cpu").items()}


def run_sequence(runner, bundle: Bundle) -> list[np.ndarray]:
    """A prefill of the smallest gear and two decode steps, with made-up ids; the logits of each."""
    graphs, cfg = bundle.manifest["graphs"], bundle.config
    gear, capacity = min(graphs["prefill_gears"]), graphs["capacity"]
    rng = np.random.default_rng(0)
    runner.reset()
    last = np.zeros((1, gear, 1), np.float32)
    last[0, gear - 1, 0] = 1.0
    logits = [runner.run(f"prefill:{gear}", {
        "input_ids": rng.integers(0, cfg.vocab_size, (1, gear)).astype(np.int32),
        "position_ids": np.broadcast_to(np.arange(gear, dtype=np.int32), (1, 2, gear)).copy(),
        "attention_bias": np.triu(np.full((gear, gear), -1e4, np.float32), 1)[None, None], "last_position": last})]
    for step in range(2):
        write = np.zeros((1, 1, capacity, 1), np.float32)
        write[0, 0, gear + step, 0] = 1.0
        bias = np.full((1, 1, 1, capacity), -1e4, np.float32)
        bias[..., : gear + step + 1] = 0.0
        logits.append(runner.run("decode", {"input_ids": np.array([[5 + step]], np.int32),
                                            "position_ids": np.full((1, 2, 1), gear + step, np.int32),
                                            "attention_bias": bias, "write_slot": write}))
    return logits


def test_onnxruntime_takes_outputs_by_position(bundle, tmp_path):
    files = check_graphs(bundle)
    want = run_sequence(OrtGraphRunner({k: str(v) for k, v in files.items()}, threads=1), bundle)
    got = run_sequence(OrtGraphRunner(renamed(files, tmp_path / "renamed"), threads=1), bundle)
    assert [g.shape for g in got] == [(1, bundle.config.vocab_size)] * 3
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(w, g)


def test_a_graph_with_the_wrong_output_count_is_refused(bundle, tmp_path):
    files = check_graphs(bundle)
    gear = min(bundle.manifest["graphs"]["prefill_gears"])
    layers = bundle.config.num_layers
    with pytest.raises(EngineError, match=rf"^graph prefill:{gear} has {2 * layers} outputs where 1 \+ {2 * layers} were "
                                          r"expected \(logits, then each layer's present key and value, as the decode "
                                          r"step's past_\* inputs\): re-export the bundle$"):
        OrtGraphRunner(renamed(files, tmp_path / "renamed", drop_last=f"prefill:{gear}"), threads=1)


def test_a_present_that_does_not_fit_its_past_input_is_named():
    """What Lite 2.0.0's Pad defect produced ([1, 4, 64, 472] for [1, 4, 512, 24]) is one clear error, not a resize."""
    names = ["input_ids", "past_key.0", "past_value.0"]
    shapes = [[1, 1], [-1, 4, 512, 24], [-1, 4, 512, 24]]
    good, bad = np.zeros((1, 4, 512, 24), np.float32), np.zeros((1, 4, 64, 472), np.float32)
    ids = {"input_ids": np.zeros((1, 1), np.int32)}
    values = graph_inputs("decode", names, shapes, ids, [good, good])
    assert values[0] is ids["input_ids"] and values[1] is good and values[2] is good
    with pytest.raises(ValueError, match=r"^output 2 of the previous graph has shape \[1, 4, 64, 472\] where input "
                                         r"past_value.0 of graph decode takes \[-1, 4, 512, 24\]$"):
        graph_inputs("decode", names, shapes, ids, [good, bad])
    with pytest.raises(ValueError, match=r"^graph decode takes 2 past_\* inputs and 0 presents are kept \(run a prefill "
                                         r"graph first, or re-export the bundle\)$"):
        graph_inputs("decode", names, shapes, ids, [])
    assert graph_inputs("prefill:4", ["input_ids"], [[1, 4]], ids, [good]) == [ids["input_ids"]]


@needs_lite
def test_the_real_server_takes_outputs_by_position_and_reports_progress(bundle, tmp_path):
    """Graphs whose outputs carry each other's names give onnxruntime's logits for the original graphs; the first load
    converts and builds each graph, a second one (converted models cached) only builds."""
    files = check_graphs(bundle)
    want = run_sequence(OrtGraphRunner({k: str(v) for k, v in files.items()}, threads=1), bundle)
    graphs = lite_specs(bundle, renamed(files, tmp_path / "renamed"))
    heard: list[str] = []
    runner = LiteStepServer(graphs, tmp_path / "cache", bundle.config.vocab_size, threads=1, progress=heard.append)
    got = run_sequence(runner, bundle)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-3)  # float rounding; a mix-up is far off
    count = len(graphs)
    assert heard == [f"MindSpore Lite: {stage} {key} (graph {i} of {count})" for i, key in enumerate(graphs, 1)
                     for stage in ("converting", "building")]
    runner.close()
    heard.clear()
    runner.reset()
    assert heard == [f"MindSpore Lite: building {key} (graph {i} of {count})" for i, key in enumerate(graphs, 1)]
    runner.close()


@needs_lite
def test_the_real_server_refuses_a_graph_with_the_wrong_output_count(bundle, tmp_path):
    """Lite 2.0.0 cannot list a model's outputs before running it: the first run of such a graph fails."""
    gear = min(bundle.manifest["graphs"]["prefill_gears"])
    graphs = lite_specs(bundle, renamed(check_graphs(bundle), tmp_path / "renamed", drop_last=f"prefill:{gear}"))
    runner = LiteStepServer(graphs, tmp_path / "cache", bundle.config.vocab_size, threads=1)
    layers = bundle.config.num_layers
    with pytest.raises(EngineError, match=rf"^MindSpore Lite: ValueError: graph prefill:{gear} has {2 * layers} outputs "
                                          rf"where 1 \+ {2 * layers} were expected"):
        run_sequence(runner, bundle)
    runner.close()


@needs_lite
def test_the_command_line_shows_the_load_progress(bundle, tmp_path):
    """What a field engineer sees on first use of an Ascend bundle: a line per graph converted and built, then the
    answer; the second run finds the converted graphs and only builds them."""
    import subprocess

    env = {**os.environ, "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache"), "STREAMCHAT_DATA_DIR": str(tmp_path / "data"),
           "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config")}
    argv = [sys.executable, "-m", "streamchat", "generate", "--bundle", str(bundle.path), "--engine", "mindspore-lite",
            "--prompt", "你好", "--greedy", "--max-new-tokens", "4"]
    graphs = len(bundle.manifest["graphs"]["check"])
    for run, stages in ((1, ("converting", "building")), (2, ("building",))):
        proc = subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0 and proc.stdout.strip(), (run, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("MindSpore Lite: ")]
        assert len(lines) == graphs * len(stages), (run, lines)
        assert {line.split()[2] for line in lines} == set(stages)
        assert lines[-1].endswith(f"(graph {graphs} of {graphs})")
