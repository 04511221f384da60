"""``streamchat serve --devices``: one engine replica per device id, each in a worker process of its own, tested with
the real server on a free port and real clients. The workers run on the CPU (``--device cpu``): MindSpore (the
910B route) on the demo model exported for ascend-910b, or, where MindSpore is not installed, onnxruntime on the demo's
cpu bundle, so the process boundary is tested either way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import websockets

from appliance.history import History
from appliance.loading import DEMO_CHECKPOINT
from model_export.export import export_bundle
from streamchat.cli import main
from tests.ports import free_port
from tests.test_service import LONG, PROMPT, _env

try:
    import mindspore  # noqa: F401

    ENGINE, TARGET, QUANT = "mindspore", "ascend-910b", "fp32"
except ImportError as exc:
    print(f"worker tests run onnxruntime in the workers: mindspore is not importable ({exc})")
    ENGINE, TARGET, QUANT = "onnxruntime", "cpu", "int8"
RUNS_TO_CONTEXT = {**LONG, "temperature": 10}  # a sampled answer that runs into the demo's 512-token context

WORKER = "appliance.engines.worker"


class DeviceServer:
    """``serve --bundle B --engine ENGINE --device cpu --devices DEVICES`` on a free port, ready; its output piped
    (read at its end), or discarded (``quiet``) by a test that never reads it."""

    def __init__(self, root: Path, bundle: Path, devices: str = "0,1", env: dict[str, str] | None = None,
                 quiet: bool = False) -> None:
        self.root, self.bundle, self.port = root, bundle, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws/chat"
        self.env = env or _env(root)
        output = subprocess.DEVNULL if quiet else subprocess.PIPE
        self.process = subprocess.Popen([sys.executable, "-m", "streamchat", "serve", "--bundle", str(bundle),
                                         "--engine", ENGINE, "--device", "cpu", "--devices", devices, "--port",
                                         str(self.port)], env=self.env, stdout=output, stderr=output, text=True)
        self.wait_ready(300)

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                reply = httpx.get(self.url + "/ready", timeout=2)
                if reply.status_code == 200:
                    return reply.json()
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become ready")

    def workers(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.process.pid).children(recursive=True) if WORKER in p.cmdline()]

    def requests(self) -> dict[int, float]:
        """streamchat_replica_requests_total by worker pid."""
        found = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith("streamchat_replica_requests_total{"):
                labels = dict(part.split("=") for part in line[line.index("{") + 1:line.index("}")].split(","))
                found[int(labels["pid"].strip('"'))] = float(line.rpartition(" ")[2])
        return found


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    bundle = export_bundle(DEMO_CHECKPOINT, root / "bundle", target=TARGET, quant=QUANT).bundle
    srv = DeviceServer(root, bundle)
    yield srv
    if srv.process.poll() is None:
        srv.process.terminate()
        srv.process.communicate(timeout=60)


def generate(srv: DeviceServer, *args: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "streamchat", "generate", "--bundle", str(srv.bundle), "--engine",
                          ENGINE, "--device", "cpu", "--json", *args], env=srv.env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


async def _answer(url: str, frame: dict, timeline: list[float] | None = None) -> tuple[str, dict]:
    """One message on its own connection: the joined deltas and the closing frame; ``timeline`` gets the times of
    the first delta and of the closing frame."""
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps(frame))
        text = []
        while (reply := json.loads(await ws.recv()))["type"] == "delta":
            if timeline is not None and not text:
                timeline.append(time.monotonic())
            text.append(reply["text"])
        if timeline is not None:
            timeline.append(time.monotonic())
        return "".join(text), reply


def test_two_workers_answer_at_the_same_time_and_greedy_equals_generate(served):
    srv = served
    workers = srv.workers()
    assert len(workers) == 2 and {w.pid for w in workers} == set(srv.requests())
    before = srv.requests()
    timelines: tuple[list[float], list[float]] = ([], [])

    async def both():
        return await asyncio.gather(*(_answer(srv.ws_url, RUNS_TO_CONTEXT, t) for t in timelines))

    (text_a, done_a), (text_b, done_b) = asyncio.run(both())
    assert done_a["type"] == done_b["type"] == "done" and done_a["stop_reason"] == done_b["stop_reason"] == "context"
    assert text_a == text_b  # the same seed on two workers: the same answer
    (first_a, end_a), (first_b, end_b) = timelines
    assert first_a < end_b and first_b < end_a, timelines  # both streamed at once
    after = srv.requests()
    assert {pid: after[pid] - before[pid] for pid in after} == {w.pid: 1 for w in workers}  # one on each worker

    text, done = asyncio.run(_answer(srv.ws_url, {"text": PROMPT, "greedy": True, "max_new_tokens": 64}))
    assert done["stop_reason"] == "eos" and len(text) > 10
    assert generate(srv, "--prompt", PROMPT, "--greedy", "--max-new-tokens", "64")["response"] == text
    assert History(srv.root / "data").messages(done["conversation_id"])[-1].text == text


def _busy_worker(srv: DeviceServer, before: dict[int, float]) -> int:
    """The pid of the worker that was handed a request since ``before``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        moved = [pid for pid, count in srv.requests().items() if count > before.get(pid, 0)]
        if moved:
            assert len(moved) == 1, moved
            return moved[0]
        time.sleep(0.02)
    raise AssertionError("no worker took the request")


def test_a_killed_worker_fails_its_answer_only_and_is_restarted(served):
    srv = served
    before, pids = srv.requests(), {w.pid for w in srv.workers()}

    async def killed_mid_answer():
        async with websockets.connect(srv.ws_url) as ws:
            await ws.send(json.dumps(RUNS_TO_CONTEXT))
            assert json.loads(await ws.recv())["type"] == "delta"
            victim = _busy_worker(srv, before)
            psutil.Process(victim).send_signal(signal.SIGKILL)
            while (reply := json.loads(await ws.recv()))["type"] == "delta":
                pass
            return victim, reply

    victim, reply = asyncio.run(killed_mid_answer())
    assert reply["type"] == "error", reply
    assert f"the engine worker (pid {victim}) was killed by signal 9" in reply["message"], reply
    ready = httpx.get(srv.url + "/ready")
    assert ready.status_code == 503, ready.text
    assert ready.json()["status"] == "degraded" and ready.json()["replicas"] == 1
    assert [d["reason"] for d in ready.json()["down"]] == [f"the engine worker (pid {victim}) was killed by signal 9"]
    metrics = httpx.get(srv.url + "/metrics").text
    assert f'streamchat_replica_up{{device="{ready.json()["down"][0]["device"]}",pid="{victim}"' in metrics
    assert any(line.startswith("streamchat_replica_up{") and f'pid="{victim}"' in line and line.endswith(" 0.0")
               for line in metrics.splitlines()), metrics

    # the other worker keeps serving while the lost one restarts
    (survivor,) = pids - {victim}
    before = srv.requests()
    text, done = asyncio.run(_answer(srv.ws_url, {"text": PROMPT, "greedy": True, "max_new_tokens": 64}))
    assert done["type"] == "done" and done["stop_reason"] == "eos" and text
    assert srv.requests()[survivor] == before[survivor] + 1

    srv.wait_ready(300)
    new = {w.pid for w in srv.workers()}
    assert survivor in new and victim not in new and len(new) == 2
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE

    # a killed worker under a non-streaming OpenAI request: a 500 naming the worker
    before = srv.requests()
    result = {}
    request = threading.Thread(target=lambda: result.update(reply=httpx.post(
        srv.url + "/v1/chat/completions", timeout=120,
        json={"messages": [{"role": "user", "content": RUNS_TO_CONTEXT["text"]}], "max_tokens": 8192,
              **{key: RUNS_TO_CONTEXT[key] for key in ("temperature", "top_k", "top_p", "seed")}})))
    request.start()
    victim = _busy_worker(srv, before)
    time.sleep(0.2)
    psutil.Process(victim).send_signal(signal.SIGKILL)
    request.join(120)
    assert result["reply"].status_code == 500, result["reply"].text
    assert f"the engine worker (pid {victim}) was killed by signal 9" in result["reply"].json()["error"]["message"]
    srv.wait_ready(300)


def test_sigterm_stops_every_worker(served):
    srv = served
    workers = srv.workers()
    assert len(workers) == 2

    async def chat():
        async with websockets.connect(srv.ws_url) as ws:
            await ws.send(json.dumps(RUNS_TO_CONTEXT))
            await ws.recv()
            srv.process.terminate()
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()

    asyncio.run(chat())
    assert srv.process.wait(timeout=60) == -signal.SIGTERM
    _, err = srv.process.communicate(timeout=10)
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, [(p.pid, p.status()) for p in alive]
    assert "Traceback" not in err, err


def test_queued_requests_are_refused_once_no_replica_can_come_back(served, tmp_path):
    """The one worker dies with a request queued, and its restart fails (the bundle is gone): the queued request gets
    an error at once (it used to wait forever, while newer requests were told the replica was restarting)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(served.bundle, bundle)
    srv = DeviceServer(tmp_path, bundle, devices="0", env=served.env, quiet=True)
    process = srv.process
    try:
        (worker,) = srv.workers()

        async def scenario():
            async with websockets.connect(srv.ws_url) as running, websockets.connect(srv.ws_url) as queued:
                await running.send(json.dumps(RUNS_TO_CONTEXT))
                assert json.loads(await running.recv())["type"] == "delta"
                await queued.send(json.dumps({"text": PROMPT, "max_new_tokens": 8}))
                while "streamchat_queue_depth 1.0" not in httpx.get(srv.url + "/metrics").text:
                    await asyncio.sleep(0.02)
                shutil.rmtree(bundle)
                worker.kill()
                return json.loads(await asyncio.wait_for(queued.recv(), 60))

        reply = asyncio.run(scenario())
        assert reply["type"] == "error", reply
        assert reply["message"] == ("no replica is running (0 of 1 restarting after their worker stopped): try again "
                                    "when /ready answers 200")
        assert "streamchat_queue_depth 0.0" in httpx.get(srv.url + "/metrics").text
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_sigterm_with_a_hung_worker_stops_it_and_keeps_the_message(served, tmp_path):
    """A worker that hangs (stopped, not dead) mid-answer: SIGTERM still ends the server within its grace periods,
    stops the worker and keeps the message (the shutdown used to wait for the worker's 30-minute reply deadline)."""
    srv = DeviceServer(tmp_path, served.bundle, devices="0", quiet=True)
    process = srv.process
    try:
        (worker,) = srv.workers()

        async def scenario():
            async with websockets.connect(srv.ws_url) as ws:
                worker.suspend()
                await ws.send(json.dumps({"text": PROMPT, "max_new_tokens": 8}))
                await asyncio.sleep(1)
                started = time.monotonic()
                process.terminate()
                await asyncio.to_thread(process.wait, 120)
                return time.monotonic() - started

        took = asyncio.run(scenario())
        assert process.returncode == -signal.SIGTERM and took < 60, took
        assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
        conversation = History(tmp_path / "data").conversations()[0]
        assert [m.text for m in History(tmp_path / "data").messages(conversation.id)][:1] == [PROMPT]
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()


def test_sigterm_while_workers_load_leaves_none_behind(served, tmp_path):
    """uvicorn ends a SIGTERMed server by raising the signal again, so no exit hook runs: the workers still loading
    must be stopped by the shutdown itself (they used to load on as orphans, then die writing to a closed pipe)."""
    port, log = free_port(), tmp_path / "stderr"
    process = subprocess.Popen([sys.executable, "-m", "streamchat", "serve", "--bundle", str(served.bundle), "--engine",
                                ENGINE, "--device", "cpu", "--devices", "0,1", "--port", str(port)], env=served.env,
                               stdout=subprocess.DEVNULL, stderr=log.open("w"))  # a file: orphans would hold a pipe
    deadline = time.monotonic() + 120
    while len(workers := [p for p in psutil.Process(process.pid).children() if WORKER in p.cmdline()]) < 2:
        assert time.monotonic() < deadline and process.poll() is None, "no workers started"
        time.sleep(0.02)
    process.terminate()
    assert process.wait(timeout=60) == -signal.SIGTERM
    _, alive = psutil.wait_procs(workers, timeout=5)
    for orphan in alive:
        orphan.kill()
    assert not alive, alive
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.parametrize(("flags", "message"), [
    (["--devices", "0,1", "--replicas", "2"], "give --devices (one replica per device, each in a worker process) or "
                                              "--replicas (that many in this process), not both"),
    (["--devices", "0,a"], "--devices takes device ids separated by commas, such as 0,1,2,3; not '0,a'"),
    (["--devices", "1,1"], "--devices names a device twice (1,1): one replica per device"),
    (["--devices", "0,1", "--device-id", "3"], "--device-id picks the one NPU of a single replica; with --devices each "
                                               "replica has its own: leave --device-id out"),
])
def test_bad_device_flags_are_one_line(tmp_path, monkeypatch, capsys, flags, message):
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert main(["serve", "--bundle", str(tmp_path / "missing"), *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
