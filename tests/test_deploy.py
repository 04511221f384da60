"""The deployment recipes agree with the code: the Containerfile's and the Kubernetes manifest's arguments are real
`streamchat serve` options (parsed by the CLI's own parser), the probes and the scrape path are endpoints a running
server answers as the recipes use them (probes without the token), the documented Ascend variant builds the same
Containerfile with arguments it declares and mounts the NPU's devices, and the systemd unit is the hardened, disabled
one the .deb ships. Building and running the image: tests/test_container.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from streamchat.cli import build_parser
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "installers/container/Containerfile"
MANIFEST = ROOT / "deploy/kubernetes/streamchat.yaml"
UNIT = ROOT / "installers/deb/streamchat-serve.service"
ASCEND_DEVICES = {"/dev/davinci0", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"}
ASCEND_MOUNTS = {"/usr/local/Ascend/driver", "/usr/local/bin/npu-smi"}


def instructions(path: Path = CONTAINERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction, continuation lines joined, comments left out."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                             if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in joined.splitlines() if line.strip()]


def instruction(keyword: str) -> list[str]:
    return [rest for key, rest in instructions() if key == keyword]


def serve_args(*args: str):
    """The CLI's own parser on `streamchat serve ARGS` (SystemExit 2 on an unknown flag or a bad value)."""
    parsed = build_parser().parse_args(["serve", *args])
    assert parsed.func.__name__ == "cmd_serve"
    return parsed


def test_containerfile_instructions_and_command_are_real_serve_options():
    known = {"ARG", "FROM", "COPY", "RUN", "ENV", "VOLUME", "WORKDIR", "USER", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK",
             "ENTRYPOINT", "CMD", "LABEL"}
    assert {key for key, _ in instructions()} <= known
    entrypoint, cmd = json.loads(instruction("ENTRYPOINT")[0]), json.loads(instruction("CMD")[0])
    assert entrypoint[:2] == ["streamchat", "serve"]
    parsed = serve_args(*entrypoint[2:], *cmd)
    assert parsed.demo and parsed.host == "0.0.0.0" and str(parsed.token_file) == "/run/secrets/streamchat-token"
    assert instruction("EXPOSE") == [str(parsed.port)] and instruction("STOPSIGNAL") == ["SIGTERM"]
    assert instruction("USER") == ["10001:10001"] and instruction("VOLUME") == ["/var/lib/streamchat"]
    health = instruction("HEALTHCHECK")[0]
    assert f"http://127.0.0.1:{parsed.port}/health" in health and json.loads(health.split(" CMD ", 1)[1])[0] == "python3"


def _manifest() -> tuple[dict, dict]:
    documents = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    assert set(documents) == {"Deployment", "Service"}
    return documents["Deployment"], documents["Service"]


def test_kubernetes_manifest_args_mounts_and_security_match_the_image():
    deployment, service = _manifest()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    entrypoint = json.loads(instruction("ENTRYPOINT")[0])
    parsed = serve_args(*entrypoint[2:], *container["args"])
    assert parsed.bundle is not None and parsed.history_url.startswith("postgresql://")
    assert "@" in parsed.history_url and ":" not in parsed.history_url.split("//", 1)[1].split("@")[0]  # no password
    assert deployment["spec"]["replicas"] >= 2
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # the bundle lies on a read-only mount of a read-only claim
    models = next(m for path, m in mounts.items() if str(parsed.bundle).startswith(path + "/"))
    assert models["readOnly"] is True and volumes[models["name"]]["persistentVolumeClaim"]["readOnly"] is True
    # the token file is the Secret's item where --token-file looks
    token = mounts[str(parsed.token_file.parent)]
    secret = volumes[token["name"]]["secret"]
    assert token["readOnly"] is True and [item["path"] for item in secret["items"]] == [parsed.token_file.name]
    password = next(e for e in container["env"] if e["name"] == "PGPASSWORD")["valueFrom"]["secretKeyRef"]
    assert password["name"] == secret["secretName"]
    # the state folder of the image, and the user it runs as
    assert "/var/lib/streamchat" in mounts and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["readOnlyRootFilesystem"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == parsed.port == int(instruction("EXPOSE")[0])
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert pod["terminationGracePeriodSeconds"] > 10  # the server's own grace for answers in flight


def test_probes_and_scrape_path_are_endpoints_a_running_server_answers(tmp_path):
    deployment, _ = _manifest()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
    token = "probe-test-token-0123456789"
    (tmp_path / "token").write_text(token)
    port = free_port()
    env = {**os.environ, "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"), "STREAMCHAT_DATA_DIR": str(tmp_path / "data"),
           "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("STREAMCHAT_HISTORY_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "streamchat", "serve", "--demo", "--port", str(port), "--token-file",
                               str(tmp_path / "token")], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
        assert readiness["port"] == liveness["port"] == "http"
        deadline = time.monotonic() + 120
        while True:  # probes send no token: they must answer without one
            try:
                if httpx.get(url + readiness["path"], timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        assert httpx.get(url + liveness["path"], timeout=5).json() == {"status": "ok"}
        assert httpx.get(url + annotations["prometheus.io/path"], timeout=5).status_code == 401
        metrics = httpx.get(url + annotations["prometheus.io/path"], headers={"Authorization": f"Bearer {token}"},
                            timeout=5)
        assert metrics.status_code == 200 and "streamchat_queue_depth" in metrics.text
    finally:
        server.terminate()
        server.communicate(timeout=60)


def _ascend_commands() -> list[list[str]]:
    """The shell commands of docs/service.md's Ascend variant block, as argument lists."""
    text = (ROOT / "docs/service.md").read_text()
    block = re.search(r"```sh\n(# Ascend variant.*?)```", text, re.S)
    assert block, "docs/service.md has no Ascend variant block"
    lines = re.sub(r"\\\n", " ", block.group(1))
    return [shlex.split(line, comments=True) for line in lines.splitlines() if shlex.split(line, comments=True)]


def test_ascend_variant_builds_this_containerfile_and_mounts_the_npu():
    commands = _ascend_commands()
    build = next(c for c in commands if "installers/container/build.sh" in c)
    env = dict(word.split("=", 1) for word in build[:build.index("installers/container/build.sh")])
    assert env["STREAMCHAT_IMAGE_BASE"].startswith("swr.cn-south-1.myhuaweicloud.com/mindspore/mindspore-ascend:")
    extra = shlex.split(env["STREAMCHAT_BUILD_ARGS"])
    build_args = dict(value.split("=", 1) for flag, value in zip(extra, extra[1:], strict=False) if flag == "--build-arg")
    assert build_args == {"VENV_FLAGS": "--system-site-packages"}  # the image's MindSpore stays visible
    assert set(build_args) <= {rest.split("=")[0] for rest in instruction("ARG")}
    run = next(c for c in commands if "run" in c and "--device" in " ".join(c))
    devices = {value for flag, value in zip(run, run[1:], strict=False) if flag == "--device"}
    volumes = {value.split(":")[0] for flag, value in zip(run, run[1:], strict=False) if flag in ("-v", "--volume")}
    assert devices >= ASCEND_DEVICES and volumes >= ASCEND_MOUNTS
    image = next(i for i, word in enumerate(run) if word.startswith("localhost/streamchat"))
    entrypoint = json.loads(instruction("ENTRYPOINT")[0])
    parsed = serve_args(*entrypoint[2:], *run[image + 1:])
    assert parsed.bundle is not None and parsed.device == "ascend"


def test_systemd_unit_is_hardened_and_reads_its_options_from_the_default_file():
    """`systemd-analyze verify` runs in installers/test.sh's Debian root, where the package is installed."""
    unit: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            unit.setdefault(key, []).append(value)
    for option in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "RestrictSUIDSGID",
                   "DynamicUser"):
        assert unit[option] == ["yes"], option
    assert unit["ProtectSystem"] == ["strict"] and unit["StateDirectory"] == ["streamchat-serve"]
    assert unit["CapabilityBoundingSet"] == [""] and unit["WantedBy"] == ["multi-user.target"]
    assert unit["EnvironmentFile"] == ["-/etc/default/streamchat-serve"]
    command = shlex.split(unit["ExecStart"][0])
    assert command == ["/usr/bin/streamchat", "serve", "$STREAMCHAT_SERVE_ARGS"]
    defaults = dict(line.split("=", 1) for line in (ROOT / "installers/deb/streamchat-serve.default").read_text()
                    .splitlines() if line and not line.startswith("#"))
    parsed = serve_args(*shlex.split(shlex.split(defaults["STREAMCHAT_SERVE_ARGS"])[0]))
    assert parsed.demo and parsed.host == "127.0.0.1"  # loopback by default: no token needed
    for env in unit["Environment"]:
        assert all(v.startswith("STREAMCHAT_") for v in env.split())
