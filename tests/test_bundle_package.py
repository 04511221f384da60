"""Bundle packages: pack, install with verification and an atomic switch, refusal of damaged or hostile files."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from appliance.bundle import Bundle
from appliance.bundle_package import install, pack
from appliance.errors import BundleError
from model_export.export import export_bundle
from streamchat.cli import main
from tests.conftest import TINY


@pytest.fixture(autouse=True)
def _dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("STREAMCHAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def packed(tmp_path):
    bundle = export_bundle(TINY, tmp_path / "tiny-int8", quant="int8").bundle
    return pack(bundle, tmp_path / "tiny-int8.tar")


def test_pack_and_install_through_the_cli(tmp_path, capsys):
    bundle = export_bundle(TINY, tmp_path / "tiny-int8", quant="int8").bundle
    assert main(["bundle", "pack", str(bundle), "--out", str(tmp_path / "t.tar")]) == 0
    assert main(["bundle", "install", str(tmp_path / "t.tar")]) == 0
    installed = tmp_path / "data" / "bundles" / "tiny-int8"
    assert installed.is_symlink() and Bundle.open(installed).manifest == Bundle.open(bundle).manifest
    assert "installed and verified" in capsys.readouterr().out


def test_reinstall_switches_atomically_and_cleans_up(packed, tmp_path):
    models = tmp_path / "models"
    first = install(packed, models).resolve()
    second = install(packed, models).resolve()
    assert first != second and not first.exists() and Bundle.open(models / "tiny-int8")
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["tiny-int8"]
    assert len([p for p in models.iterdir() if p.name.startswith(".")]) == 1  # just the live version


def test_damaged_package_leaves_the_old_bundle_working(packed, tmp_path):
    models = tmp_path / "models"
    install(packed, models)
    before = os.readlink(models / "tiny-int8")
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the weights
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch|truncated|damaged"):
        install(damaged, models)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(packed.read_bytes()[: len(data) // 3])
    with pytest.raises(BundleError):
        install(truncated, models)
    assert os.readlink(models / "tiny-int8") == before and Bundle.open(models / "tiny-int8", full_check=True)
    assert not [p for p in models.iterdir() if "installing" in p.name]


def test_hostile_archive_is_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as archive:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(BundleError, match="unsafe entry"):
        install(evil, tmp_path / "models")
    assert not (tmp_path / "escape.txt").exists()


def test_self_test_on_the_demo(tmp_path):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "streamchat", "--self-test"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("self-test ok: model DEMO") and "StreamChat" in proc.stdout
    export = subprocess.run([sys.executable, "-m", "streamchat", "history", "export", "--format", "json", "--out",
                             str(tmp_path / "h.json")], capture_output=True, text=True, env=env)
    assert export.returncode == 0, export.stderr
    assert json.loads((tmp_path / "h.json").read_text())["conversations"] == []  # the self-test cleans up


@pytest.mark.skipif(not __import__("shutil").which("dpkg-deb"), reason="needs dpkg-deb")
def test_pack_as_a_system_deb(tmp_path):
    bundle = export_bundle(TINY, tmp_path / "Tiny_INT8", quant="int8").bundle
    assert main(["bundle", "pack", str(bundle), "--format", "deb", "--out", str(tmp_path / "m.deb")]) == 0
    info = subprocess.run(["dpkg-deb", "--info", str(tmp_path / "m.deb")], capture_output=True, text=True).stdout
    contents = subprocess.run(["dpkg-deb", "--contents", str(tmp_path / "m.deb")], capture_output=True, text=True).stdout
    assert "Package: streamchat-model-tiny-int8" in info and "Depends: streamchat" in info
    assert "./usr/share/streamchat/models/Tiny_INT8/manifest.json" in contents
    assert "./usr/share/streamchat/models/Tiny_INT8/decoder.onnx.data" in contents
