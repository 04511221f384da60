"""The service image (installers/container/): built with podman from the local Debian base, run with the demo model
as a bundle mounted read-only, talked to over the published port with real clients, stopped with SIGTERM.

Needs podman (Debian: ``apt-get install podman runc``) and root (debootstrap makes the base; rootful podman). This
machine refuses raising resource limits and runs crun on hybrid cgroups it does not support, so the tests give podman
a containers.conf of their own: runc, and limits no higher than the current ones (valid on any machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import websockets

from appliance.history import History
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/streamchat:test"
TOKEN = "container-test-token-0123456789"
PROMPT = "StreamChat 是什么？"
LONG = {"text": "hello", "temperature": 5, "top_k": 0, "top_p": 1, "seed": 0, "max_new_tokens": 8192}

pytestmark = [
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (apt-get install podman runc)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the image's base is debootstrapped and podman runs rootful: needs root"),
]


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory) -> dict[str, str]:
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    runtime = '[engine]\nruntime = "runc"\n' if shutil.which("runc") else ""
    conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n{runtime}')
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(env: dict[str, str], *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    run = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert run.returncode == 0, f"podman {' '.join(args)}: {run.stderr}"
    return run


@pytest.fixture(scope="module")
def image(podman_env, request) -> str:
    """Build the image as the docs say (installers/container/build.sh) and report how long it took."""
    started = time.monotonic()
    build = subprocess.run([str(ROOT / "installers/container/build.sh"), IMAGE], env=podman_env, capture_output=True,
                           text=True, timeout=1200)
    assert build.returncode == 0, build.stdout + build.stderr
    assert f"built {IMAGE}" in build.stdout, build.stdout
    lines = [line for line in build.stdout.splitlines() if "built " in line or "debootstrap" in line]
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n" + "\n".join([*lines, f"container image ready in {time.monotonic() - started:.0f} s"]))
    return IMAGE


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The demo model exported on the host (the bundle the container mounts) and its greedy answer to PROMPT."""
    root = tmp_path_factory.mktemp("host")
    env = {**os.environ, "STREAMCHAT_CONFIG_DIR": str(root / "config"), "STREAMCHAT_DATA_DIR": str(root / "data"),
           "STREAMCHAT_CACHE_DIR": str(root / "cache"), "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run([sys.executable, "-m", "streamchat", "generate", "--demo", "--json", "--greedy", "--prompt",
                          PROMPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    bundle = root / "data" / "bundles" / "streamchat-demo-int8"
    assert (bundle / "manifest.json").is_file()
    for path in [bundle, *bundle.rglob("*")]:  # readable by the container's unprivileged user, never writable
        path.chmod(0o755 if path.is_dir() else 0o644)
    token = root / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o644)
    return {"bundle": bundle, "answer": json.loads(run.stdout)["response"], "token": token}


class Container:
    def __init__(self, env: dict[str, str], image: str, token: Path, mounts: list[str], args: list[str]) -> None:
        self.env, self.port, self.name = env, free_port(), f"streamchat-test-{os.getpid()}-{free_port()}"
        self.volume = self.name + "-data"
        self.url = f"http://127.0.0.1:{self.port}"
        podman(env, "run", "--detach", "--name", self.name, "--publish", f"127.0.0.1:{self.port}:8000",
               "--volume", f"{self.volume}:/var/lib/streamchat", "--volume",
               f"{token}:/run/secrets/streamchat-token:ro", *mounts, image, *args)

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return podman(self.env, "exec", self.name, *command, check=check)

    def healthy(self, timeout: float = 120) -> None:
        """The image's own HEALTHCHECK, run by podman (no systemd timer here), then /ready."""
        deadline = time.monotonic() + timeout
        while podman(self.env, "healthcheck", "run", self.name, check=False).returncode != 0:
            state = podman(self.env, "inspect", "--format", "{{.State.Status}}", self.name).stdout.strip()
            assert state == "running" and time.monotonic() < deadline, f"{state}: {self.logs()}"
            time.sleep(0.5)
        assert podman(self.env, "inspect", "--format", "{{.State.Health.Status}}", self.name).stdout.strip() == "healthy"
        while httpx.get(self.url + "/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.2)

    def logs(self) -> str:
        return podman(self.env, "logs", self.name, check=False).stderr

    def wait(self) -> int:
        return int(podman(self.env, "wait", self.name, timeout=60).stdout.strip())

    def history(self) -> History:
        mountpoint = podman(self.env, "volume", "inspect", "--format", "{{.Mountpoint}}", self.volume).stdout.strip()
        return History(Path(mountpoint) / "data")

    def remove(self) -> None:
        podman(self.env, "rm", "--force", "--time", "0", self.name, check=False)
        podman(self.env, "volume", "rm", "--force", self.volume, check=False)


@pytest.fixture
def container(podman_env, image, demo):
    started: list[Container] = []

    def start(*args: str, mounts: tuple[str, ...] = ()) -> Container:
        started.append(Container(podman_env, image, demo["token"], list(mounts), list(args)))
        return started[-1]

    yield start
    for c in started:
        c.remove()


def test_image_serves_a_read_only_bundle_as_non_root_and_stops_cleanly_on_sigterm(container, demo):
    c = container("--bundle", "/models/demo", "--token-file", "/run/secrets/streamchat-token",
                  mounts=("--volume", f"{demo['bundle']}:/models/demo:ro"))
    c.healthy()
    # not root: the server process (PID 1) and anything started in the container
    status = c.exec("cat", "/proc/1/status").stdout
    assert [line.split()[1:] for line in status.splitlines() if line.startswith(("Uid:", "Gid:"))] == [["10001"] * 4] * 2
    assert c.exec("id", "-un").stdout.strip() == "streamchat"
    assert c.exec("python3", "-c", "import psycopg, websockets").returncode == 0  # --history-url, /ws/chat
    # the bundle is mounted read-only: the mount says so and a write is refused
    mounts = [line.split() for line in c.exec("cat", "/proc/mounts").stdout.splitlines()]
    assert "ro" in next(m for m in mounts if m[1] == "/models/demo")[3].split(",")
    refused = c.exec("touch", "/models/demo/probe", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    # a token guards everything but the probes
    assert httpx.get(c.url + "/v1/models", timeout=10).status_code == 401

    client = openai.OpenAI(base_url=c.url + "/v1", api_key=TOKEN, max_retries=0)
    reply = client.chat.completions.create(model="streamchat", temperature=0, max_tokens=64,
                                           messages=[{"role": "user", "content": PROMPT}])
    assert reply.choices[0].message.content == demo["answer"]  # greedy: the host's `streamchat generate`

    async def websocket_turns():
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with websockets.connect(c.url.replace("http", "ws") + "/ws/chat", additional_headers=headers) as ws:
            await ws.send(json.dumps({"text": PROMPT, "greedy": True}))
            deltas = []
            while (frame := json.loads(await ws.recv()))["type"] == "delta":
                deltas.append(frame["text"])
            # an answer in flight when the container is stopped
            await ws.send(json.dumps(LONG))
            assert json.loads(await ws.recv())["type"] == "delta"
            podman(c.env, "kill", "--signal", "TERM", c.name)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await ws.recv()
            return "".join(deltas), frame, closed.value.rcvd.code

    answer, done, close_code = asyncio.run(websocket_turns())
    assert done["type"] == "done" and done["stop_reason"] == "eos" and answer == demo["answer"]
    assert close_code == 1012  # "service restart": the server closed it while shutting down
    assert c.wait() == 0, c.logs()  # PID 1 in its namespace: the re-raised SIGTERM is ignored, `serve` returns 0
    assert "Traceback" not in c.logs()
    # the history outlives the container in its volume: both turns, the second stored as cancelled
    stored = c.history().messages(done["conversation_id"])
    assert [(m.role, m.text) for m in stored[:2]] == [("user", PROMPT), ("assistant", answer)]
    assert [m.role for m in stored[2:]] == ["user", "assistant"] and stored[3].stop_reason == "cancelled"


def test_default_command_serves_the_demo_and_refuses_to_start_without_its_token(container, podman_env, image):
    c = container()  # the image's CMD: --demo --token-file /run/secrets/streamchat-token
    c.healthy()
    reply = httpx.post(c.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                       json={"messages": [{"role": "user", "content": PROMPT}], "temperature": 0})
    assert reply.status_code == 200 and reply.json()["model"] == "streamchat-demo-int8"
    podman(podman_env, "stop", "--time", "30", c.name)
    assert c.wait() == 0
    # no token mounted: one line from `serve`, exit 2, before anything binds
    run = podman(podman_env, "run", "--rm", image, check=False)
    said = [line for line in run.stderr.splitlines() if not line.startswith("time=")]  # podman's own (systemd) notes
    assert run.returncode == 2, run.stderr
    assert said == ["error: cannot read token file /run/secrets/streamchat-token: No such file or directory"], said
