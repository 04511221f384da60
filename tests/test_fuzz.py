"""Fuzzing the untrusted inputs through the real command line: bundle manifests, checkpoint indexes and configs, bundle
packages and history imports.

For every generated input the command must succeed, or fail with exit 2 and exactly one ``error:`` line (no
traceback, no exit 1 "unexpected error"), write nothing outside its target, and finish within a deadline.
Examples are derandomized (the same inputs on every run, so CI is repeatable); ``STREAMCHAT_FUZZ_SCALE=10`` runs ten
times as many.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.bundle import MANIFEST
from model_export.export import export_bundle
from streamchat.cli import main
from tests.conftest import TINY

SCALE = int(os.environ.get("STREAMCHAT_FUZZ_SCALE", "1"))
DEADLINE_S = 30


def fuzz_settings(examples: int):
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


class Hang(BaseException):
    """Raised by the alarm: a command took longer than DEADLINE_S (BaseException, so no handler can swallow it)."""


def _alarm(signum, frame):
    raise Hang(f"no answer within {DEADLINE_S} s")


def run_cli(argv: list[str]) -> tuple[int, list[str]]:
    """Run the real ``streamchat`` entry point in this process; (exit code, stderr lines)."""
    err, out = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(DEADLINE_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue().splitlines()


def assert_clean_outcome(code: int, lines: list[str]) -> None:
    """Success, or exit 2 with one error line that is the last thing printed."""
    assert not any("Traceback" in line for line in lines), lines
    if code == 0:
        return
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0], (code, lines)
    assert "unexpected error" not in errors[0], errors[0]


def snapshot(root: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` but the ``skip`` folders, with size and mtime: what a command must not touch."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in [*dirnames, *filenames]:
            st_ = (here / name).lstat()
            found[str((here / name).relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return found


@contextlib.contextmanager
def confined(root: Path, *targets: Path) -> Iterator[None]:
    """Assert that nothing under ``root`` outside ``targets`` (and the cache folder) changes."""
    skip = {*targets, root / "cache"}
    before = snapshot(root, skip)
    yield
    assert snapshot(root, skip) == before


@pytest.fixture(autouse=True)
def _dirs(tmp_path, monkeypatch):
    for name in ("CONFIG", "DATA", "CACHE"):
        monkeypatch.setenv(f"STREAMCHAT_{name}_DIR", str(tmp_path / name.lower()))


# -- values --------------------------------------------------------------------------------------------------------
HOSTILE_STRINGS = ["", ".", "..", "../outside", "/etc/passwd", "a/../../b", "x\x00y", "~", "\u202e", "a" * 300,
                   "decoder.onnx", "manifest.json", "mindir/../../x", "-rf", "$(touch pwned)", "1e999", "NaN"]
json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 10**12, 2**63])
                | st.floats(allow_nan=False) | st.text(max_size=20) | st.sampled_from(HOSTILE_STRINGS))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def leaf_paths(value, prefix=()) -> list[tuple]:
    """Every key path into a JSON document (objects and lists), the document itself excluded."""
    paths = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        paths.append((*prefix, key))
        paths.extend(leaf_paths(child, (*prefix, key)))
    return paths


@st.composite
def mutated(draw, document):
    """``document`` with one value replaced, one key deleted, or one key added somewhere."""
    doc = json.loads(json.dumps(document))
    paths = leaf_paths(doc)
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = draw(json_values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(json_values)
    else:
        parent.append(draw(json_values))
    return doc


# -- bundle manifests -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return export_bundle(TINY, tmp_path_factory.mktemp("fuzz-bundle") / "tiny", quant="int8").bundle


def _copy_bundle(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest)


def write_manifest(bundle: Path, manifest: dict) -> None:
    """Write ``manifest`` as the bundle's own (an attacker who can also rewrite the digest: this fuzzes the parser)."""
    (bundle / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    from appliance.bundle import seal_manifest

    seal_manifest(bundle)


@given(data=st.data())
@fuzz_settings(40)
def test_fuzz_manifest(tmp_path_factory, tiny_bundle, data):
    root = tmp_path_factory.mktemp("m")
    bundle = root / "bundle"
    _copy_bundle(tiny_bundle, bundle)
    manifest = data.draw(mutated(json.loads((tiny_bundle / MANIFEST).read_text(encoding="utf-8"))))
    write_manifest(bundle, manifest)
    with confined(root, bundle):
        assert_clean_outcome(*run_cli(["verify", str(bundle)]))
        assert_clean_outcome(*run_cli(["generate", "--bundle", str(bundle), "--prompt", "hi", "--greedy",
                                       "--max-new-tokens", "2"]))


# -- checkpoints ---------------------------------------------------------------------------------------------------
def _safetensors_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def _write_safetensors(path: Path, header, payload: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + payload)


@pytest.fixture(scope="module")
def safetensors_parts():
    return _safetensors_header(TINY / "model.safetensors")


CHECKPOINT_FILES = ("config.json", "tokenizer_config.json", "ice_text.model")


@given(data=st.data())
@fuzz_settings(40)
def test_fuzz_checkpoint_config_and_index(tmp_path_factory, safetensors_parts, data):
    root = tmp_path_factory.mktemp("c")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    for name in CHECKPOINT_FILES:
        shutil.copyfile(TINY / name, ckpt / name)
    header, payload = safetensors_parts
    if data.draw(st.booleans(), label="mutate config (else the safetensors header)"):
        config = json.loads((TINY / "config.json").read_text(encoding="utf-8"))
        (ckpt / "config.json").write_text(json.dumps(data.draw(mutated(config))), encoding="utf-8")
        _write_safetensors(ckpt / "model.safetensors", header, payload)
    else:
        _write_safetensors(ckpt / "model.safetensors", data.draw(mutated(header)), payload)
    out = root / "out"
    with confined(root, out):
        code, lines = run_cli(["export", str(ckpt), "--quant", "int8", "--out", str(out), "--quiet"])
    assert_clean_outcome(code, lines)
    assert code == 0 or not out.exists()  # all or nothing


# -- bundle packages --------------------------------------------------------------------------------------------------
MEMBER_NAMES = st.sampled_from(["tiny", "tiny/", ".", "./tiny", "..", "tiny/../x", "/abs", "tiny/manifest.json",
                                "tiny/decoder.onnx", "tiny/extra.bin", "tiny/sub/deep", ".tiny.123", "other",
                                "tiny/ice_text.model", "tiny/./manifest.json"]) | st.text(max_size=12)
MEMBER_TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                tarfile.FIFOTYPE, tarfile.GNUTYPE_SPARSE])


@pytest.fixture(scope="module")
def tiny_members(tiny_bundle) -> list[tuple[str, bytes]]:
    return [(f"tiny/{p.name}", p.read_bytes()) for p in sorted(tiny_bundle.iterdir())]


@st.composite
def package(draw, members):
    """A tar built from the real bundle's members with some replaced, dropped, added or retyped."""
    chosen = [list(m) for m in members if draw(st.integers(0, 9), label="keep") > 0]
    extra = draw(st.lists(st.tuples(MEMBER_NAMES, st.binary(max_size=64)), max_size=3))
    entries = []
    for name, body in [*map(tuple, chosen), *extra]:
        kind = tarfile.REGTYPE if draw(st.integers(0, 5)) else draw(MEMBER_TYPES)
        entries.append((name, body, kind, draw(st.sampled_from(["", "../../outside", "/etc", "tiny/decoder.onnx"]))))
    return entries, draw(st.sampled_from(["", "gz"]))


def write_package(path: Path, entries, compression: str) -> None:
    with tarfile.open(path, f"w:{compression}") as tar:
        for name, body, kind, link in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = link
            if kind in (tarfile.REGTYPE, tarfile.GNUTYPE_SPARSE):
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
            else:
                tar.addfile(info)


@given(data=st.data())
@fuzz_settings(40)
def test_fuzz_bundle_package(tmp_path_factory, tiny_members, data):
    root = tmp_path_factory.mktemp("p")
    outside = root / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("the user's file")
    into = root / "models"
    entries, compression = data.draw(package(tiny_members))
    path = root / "pkg.tar"
    write_package(path, entries, compression)
    with confined(root, into):
        assert_clean_outcome(*run_cli(["bundle", "install", str(path), "--into", str(into)]))
    assert (outside / "keep.txt").read_text() == "the user's file"


# -- history imports --------------------------------------------------------------------------------------------------
EXPORT = {"format": "streamchat-history", "version": 1, "conversations": [
    {"title": "t", "created": 1.0, "updated": 2.0, "messages": [
        {"role": "user", "text": "q", "created": 1.0, "bundle_id": "", "settings": None, "stop_reason": "",
         "timings": None},
        {"role": "assistant", "text": "a", "created": 1.5, "bundle_id": "b", "settings": {"temperature": 0.9},
         "stop_reason": "eos", "timings": {"prefill_ms": 1.0}}]}]}


@given(data=st.data())
@fuzz_settings(60)
def test_fuzz_history_import(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("h")
    os.environ["STREAMCHAT_DATA_DIR"] = str(root / "data")
    (root / "import.json").write_text(json.dumps(EXPORT), encoding="utf-8")
    assert run_cli(["history", "import", str(root / "import.json")])[0] == 0  # something to keep
    document = data.draw(mutated(EXPORT))
    (root / "import.json").write_text(json.dumps(document), encoding="utf-8")
    with confined(root, root / "data"):
        assert_clean_outcome(*run_cli(["history", "import", str(root / "import.json")]))
    code, _ = run_cli(["history", "export", "1", "--format", "json", "--out", str(root / "data" / "first.json")])
    assert code == 0
    first = json.loads((root / "data" / "first.json").read_text(encoding="utf-8"))["conversations"][0]
    assert [m["text"] for m in first["messages"]] == ["q", "a"]  # what was there before is intact
