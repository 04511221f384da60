"""Findings of the adversarial review of the hardening work, each reproduced first, then held.

Checkpoints: a zip whose directory has millions of entries, and pickles whose values break the error message itself
(huge integers, deep nesting) or rename their storage type after it was checked. History imports: timestamps that
cannot be shown, non-finite numbers in settings, files that are not files or are too big, Markdown links and images.
The terminal: bidirectional controls that make a title read backwards.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from appliance.display import one_line, printable
from appliance.errors import CheckpointError
from appliance.history import History, HistoryError, read_export
from model_export.checkpoint import INDEX_CAP, MAX_ZIP_ENTRIES, read_bin_index
from streamchat.cli import main
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("STREAMCHAT_CONFIG_DIR", str(tmp_path / "config"))


def _one_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def _ckpt(tmp_path: Path, weights: bytes) -> Path:
    """A checkpoint folder with the tiny model's config and tokenizer and ``weights`` as pytorch_model.bin."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "ice_text.model"):
        shutil.copy(TINY / name, ckpt / name)
    (ckpt / "pytorch_model.bin").write_bytes(weights)
    return ckpt


def _export_fails(ckpt: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()
    assert not (tmp_path / "cache" / "crashes").exists()
    return _one_error(capsys)


# -- 1: the zip directory is capped before zipfile reads it ------------------------------------------------------------
def _zip_with_records(records: int, declared: int | None = None, zip64: int | None = None) -> bytes:
    """A zip holding a real data.pkl entry plus ``records`` central-directory records pointing at it (the review's
    ck/many.py). The end record declares ``declared`` entries (default: the true count); ``zip64`` adds a zip64 end
    record declaring that many."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}.")
    raw = buf.getvalue()
    eocd = raw.rfind(b"PK\x05\x06")
    cd_offset = struct.unpack_from("<I", raw, eocd + 16)[0]
    local, first = raw[:cd_offset], raw[cd_offset:eocd]
    base = bytearray(first[:46])
    parts = [first]
    for i in range(records):
        name = b"x%07d" % i
        struct.pack_into("<HHH", base, 28, len(name), 0, 0)
        parts.append(bytes(base) + name)
    directory = b"".join(parts)
    count = records + 1 if declared is None else declared
    tail = b""
    if zip64 is not None:
        at = len(local) + len(directory)
        tail = (struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, zip64, zip64, len(directory), len(local))
                + struct.pack("<4sIQI", b"PK\x06\x07", 0, at, 1))
        count = 0xFFFF
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), len(directory),
                      len(local), 0)
    return local + directory + tail + end


def test_zip64_directory_with_too_many_entries_is_one_line(tmp_path, capsys):
    ckpt = _ckpt(tmp_path, _zip_with_records(70_000, zip64=70_001))
    err = _export_fails(ckpt, tmp_path, capsys)
    assert err == (f"error: pytorch_model.bin: its zip directory lists 70001 entries, more than the {MAX_ZIP_ENTRIES} "
                   "allowed (a checkpoint shard has a few hundred); this is not a usable checkpoint")


@pytest.mark.parametrize("declared", [1, None])  # the count may lie: the directory's size is capped too
def test_zip_directory_over_the_size_cap_is_one_line(tmp_path, capsys, declared):
    weights = _zip_with_records(INDEX_CAP // 54 + 10, declared=declared)
    ckpt = _ckpt(tmp_path, weights)
    err = _export_fails(ckpt, tmp_path, capsys)
    assert re.fullmatch(rf"error: pytorch_model.bin: its zip directory is \d+ bytes, more than the {INDEX_CAP} allowed "
                        r"\(a checkpoint shard's is under 100 KB\); this is not a usable checkpoint", err), err


def test_zip64_record_before_its_locator_is_checked_too(tmp_path):
    """zipfile reads the zip64 record just before the locator; the locator's own offset may point elsewhere."""
    weights = bytearray(_zip_with_records(3, zip64=4))
    locator = weights.rfind(b"PK\x06\x07")
    struct.pack_into("<Q", weights, locator + 8, 0)  # the locator now points at the start of the file
    struct.pack_into("<Q", weights, locator - 56 + 32, 10**9)  # the record zipfile uses declares 10**9 entries
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match=r"^pytorch_model.bin: its zip directory lists 1000000000 entries"):
        read_bin_index(path)


def test_a_valid_torch_zip_with_zip64_records_still_reads():
    refs = read_bin_index(TINY / "pytorch_model-00001-of-00002.bin")
    assert "transformer.layers.0.input_layernorm.weight" in refs


def test_two_million_entry_zip_is_refused_fast_and_small(tmp_path):
    """The review's 108 MB, 2-million-entry file took 18 s and 1.17 GB before failing; 500,000 entries (27 MB) are
    refused before zipfile builds a single entry."""
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(_zip_with_records(500_000))
    probe = ("import resource, sys, time\n"
             "from appliance.errors import CheckpointError\n"
             "from model_export.checkpoint import read_bin_index\n"
             "before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()\n"
             "try:\n"
             f"    read_bin_index(__import__('pathlib').Path({str(path)!r}))\n"
             "except CheckpointError as exc:\n"
             "    print(exc)\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, time.monotonic() - start)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    message, usage = proc.stdout.splitlines()
    grown_kib, seconds = usage.split()
    assert re.fullmatch(r"pytorch_model.bin: its zip directory is \d+ bytes, more than the \d+ allowed .*", message), proc.stdout
    assert int(grown_kib) < 20_000 and float(seconds) < 1.0, usage


# -- 2: hostile pickle values are one CheckpointError line -------------------------------------------------------------
P = pickle


def _long4(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return P.LONG4 + struct.pack("<i", len(data)) + data


HUGE = -(1 << 40000)  # 12,042 digits: over Python's 4300-digit limit for int-to-str


def _global(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def _text(value: str) -> bytes:
    return P.BINUNICODE + struct.pack("<I", len(value.encode())) + value.encode()


def _rebuild(offset: bytes = b"K\x00", storage_build: bytes = b"") -> bytes:
    """``_rebuild_tensor_v2(storage, offset, (4,), (1,), False, None)`` with storage ('storage', HalfStorage, '0', 'cpu',
    4); ``storage_build`` runs on the storage type right after it is loaded (e.g. a BUILD that renames it)."""
    pid = (P.MARK + _text("storage") + _global("torch", "HalfStorage") + storage_build + _text("0") + _text("cpu")
           + b"K\x04" + P.TUPLE + P.BINPERSID)
    return (_global("torch._utils", "_rebuild_tensor_v2") + P.MARK + pid + offset + b"K\x04" + P.TUPLE1 + b"K\x01"
            + P.TUPLE1 + P.NEWFALSE + P.NONE + P.TUPLE + P.REDUCE)


def _state(key: bytes, value: bytes) -> bytes:
    return b"\x80\x02" + P.EMPTY_DICT + key + value + P.SETITEM + P.STOP


def _bin(pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/data/0", b"\0" * 64)
    return buf.getvalue()


def _renamed(name: bytes) -> bytes:
    return P.EMPTY_DICT + _text("name") + name + P.SETITEM + P.BUILD


DEPTH = 200_000
HOSTILE_PICKLES = {
    "huge negative offset": (_state(_text("a"), _rebuild(_long4(HUGE))),
                             "pytorch_model.bin: tensor a has storage_offset -<40001-bit integer>, size [4] and stride "
                             "[1]; expected non-negative integers below 2**63 (at most 8 dimensions)"),
    "huge positive offset": (_state(_text("a"), _rebuild(_long4(1 << 40000))),
                             "pytorch_model.bin: tensor a has storage_offset <40001-bit integer>, size [4]"),
    "offset past int64": (_state(_text("a"), _rebuild(P.LONG1 + b"\x09" + (1 << 63).to_bytes(9, "little"))),
                          f"pytorch_model.bin: tensor a has storage_offset {1 << 63}, size [4]"),
    "huge integer key": (_state(_long4(HUGE), _rebuild()),
                         "pytorch_model.bin: a tensor is named -<40001-bit integer>, not a string"),
    "storage renamed to Foo": (_state(_text("a"), _rebuild(storage_build=_renamed(_text("Foo")))),
                               "pytorch_model.bin: tensor a has unsupported storage type 'Foo' (supported: HalfStorage, "
                               "FloatStorage, BFloat16Storage, DoubleStorage)"),
    "storage renamed to a list": (_state(_text("a"), _rebuild(storage_build=_renamed(P.EMPTY_LIST))),
                                  "pytorch_model.bin: tensor a has unsupported storage type []"),
    "deeply nested offset": (_state(_text("a"), _rebuild(P.EMPTY_LIST + P.EMPTY_LIST * DEPTH + P.APPEND * DEPTH)),
                             "pytorch_model.bin: tensor a has storage_offset [[[[...]]]], size [4]"),
    "huge persistent id": (_state(_text("a"), _long4(HUGE) + P.BINPERSID),
                           "pytorch_model.bin: unexpected persistent id -<40001-bit integer>"),
    "deep persistent id": (_state(_text("a"), P.EMPTY_LIST * DEPTH + P.APPEND * (DEPTH - 1) + P.BINPERSID),
                           "pytorch_model.bin: unexpected persistent id [[[[...]]]]"),
}


@pytest.mark.parametrize("case", HOSTILE_PICKLES)
def test_hostile_pickle_values_are_one_checkpoint_error(case, tmp_path, capsys):
    pkl, fragment = HOSTILE_PICKLES[case]
    err = _export_fails(_ckpt(tmp_path, _bin(pkl)), tmp_path, capsys)
    assert err.startswith(f"error: {fragment}"), err
    assert len(err) < 300


# -- 3: history imports: sane timestamps, finite numbers, regular files of bounded size ---------------------------------
def _doc(created: object = 1.0, updated: object = 2.0, m_created: object = 1.0, **message) -> dict:
    return {"format": "streamchat-history", "version": 1, "conversations": [
        {"title": "t", "created": created, "updated": updated,
         "messages": [{"role": "user", "text": "hi", "created": m_created, **message}]}]}


YEAR_9999 = 253402300799  # 9999-12-31T23:59:59Z


@pytest.mark.parametrize("doc, where", [
    (_doc(updated=1e308), "conversations[0].updated"),
    (_doc(created=-1e308), "conversations[0].created"),
    (_doc(created=-1), "conversations[0].created"),
    (_doc(updated=YEAR_9999 + 1), "conversations[0].updated"),
    (_doc(m_created=10**400), "conversations[0].messages[0].created"),
])
def test_timestamps_outside_year_0_to_9999_are_refused(tmp_path, doc, where):
    history = History(tmp_path)
    with pytest.raises(HistoryError) as err:
        history.import_json(doc)
    assert str(err.value).startswith(f"history import is malformed: {where} must be a number of seconds since 1970 from "
                                     f"0 to {YEAR_9999} (the end of the year 9999), got ")
    assert len(str(err.value)) < 250
    assert history.conversations() == []


def test_timestamps_at_the_bounds_import_and_list(tmp_path, capsys):
    path = tmp_path / "bounds.json"
    path.write_text(json.dumps(_doc(created=0, updated=YEAR_9999, m_created=YEAR_9999)), encoding="utf-8")
    assert main(["history", "import", str(path)]) == 0
    capsys.readouterr()
    assert main(["history", "list"]) == 0
    assert re.search(r"\b(9999|10000)-\d\d-\d\d \d\d:\d\d\b", capsys.readouterr().out)


def test_review_overflowing_timestamp_is_refused_and_list_still_works(tmp_path, capsys):
    path = tmp_path / "created_bigint.json"
    path.write_text('{"format": "streamchat-history", "version": 1, "conversations": [{"title":"t","created":1e308,'
                    '"updated":-1e308,"messages":[]}]}', encoding="utf-8")
    assert main(["history", "import", str(path)]) == 2
    assert "conversations[0].created must be a number of seconds since 1970 from 0 to" in _one_error(capsys)
    assert main(["history", "list"]) == 0


@pytest.mark.parametrize("field, literal", [("timings", "NaN"), ("settings", "Infinity"), ("settings", "-Infinity")])
def test_non_finite_numbers_in_settings_and_timings_are_refused(tmp_path, capsys, field, literal):
    path = tmp_path / "nonfinite.json"
    path.write_text('{"format": "streamchat-history", "version": 1, "conversations": [{"title": "t", "created": 1, '
                    '"updated": 2, "messages": [{"role": "user", "text": "hi", "created": 1, '
                    f'"{field}": {{"temperature": {literal}}}}}]}}]}}', encoding="utf-8")
    assert main(["history", "import", str(path)]) == 2
    assert _one_error(capsys) == (f"error: history import is malformed: conversations[0].messages[0].{field}.temperature "
                                  f"must be a finite number, got {literal.lower().replace('infinity', 'inf')}; "
                                  "nothing was imported")
    assert History(tmp_path / "data").conversations() == []


def test_finite_settings_still_import(tmp_path):
    history = History(tmp_path)
    [cid] = history.import_json(_doc(settings={"temperature": 0.9, "seed": 10**30, "greedy": False},
                                     timings={"prefill_ms": 0.0}))
    assert history.messages(cid)[0].settings == {"temperature": 0.9, "seed": 10**30, "greedy": False}


IMPORT_CAP = 256 << 20


def _import_in_a_subprocess(tmp_path: Path, path: Path) -> subprocess.CompletedProcess:
    """``streamchat history import path`` in a child limited to 2 GB of address space and 60 s (reading /dev/zero or
    waiting on a FIFO must not take the test run with it)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "STREAMCHAT_DATA_DIR": str(tmp_path / "data"),
           "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"), "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "streamchat", "history", "import", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, preexec_fn=limit)


def test_import_of_a_device_is_refused_without_reading(tmp_path):
    proc = _import_in_a_subprocess(tmp_path, Path("/dev/zero"))
    assert proc.returncode == 2
    assert proc.stderr == "error: cannot import /dev/zero: not a regular file; nothing was imported\n"


def test_import_of_a_folder_is_refused(tmp_path):
    with pytest.raises(HistoryError, match=rf"^cannot import {re.escape(str(tmp_path))}: not a regular file"):
        read_export(tmp_path)


def test_import_of_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = _import_in_a_subprocess(tmp_path, fifo)
    assert proc.returncode == 2
    assert proc.stderr == f"error: cannot import {fifo}: not a regular file; nothing was imported\n"


def test_import_over_the_size_cap_is_refused_before_reading(tmp_path):
    big = tmp_path / "big.json"
    with big.open("wb") as fh:
        fh.truncate(IMPORT_CAP + 1)  # sparse: nothing to read, so a read would show up as time and memory
    start = time.monotonic()
    with pytest.raises(HistoryError) as err:
        read_export(big)
    assert time.monotonic() - start < 0.5
    assert str(err.value) == (f"cannot import {big}: it is {IMPORT_CAP + 1} bytes, more than the {IMPORT_CAP} (256 MiB) "
                              "a history export may have; nothing was imported")


def test_import_of_a_regular_file_still_reads(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(_doc()), encoding="utf-8")
    assert read_export(path) == _doc()


# -- 4: Markdown export forms no link and no image ----------------------------------------------------------------------
def _rendered(markdown: str) -> tuple[str, str]:
    """(HTML, plain text) of ``markdown`` as a GitHub-flavoured Markdown viewer (Qt's md4c) renders it."""
    gui = pytest.importorskip("PySide6.QtGui")
    doc = gui.QTextDocument()
    doc.setMarkdown(markdown, gui.QTextDocument.MarkdownDialectGitHub)
    return doc.toHtml(), doc.toPlainText()


LINKS = ("![x](http://evil.example/t.png?leak=1) [click](javascript:alert(1))\n"
         "\\[a\\](javascript:b) \\![c\\](http://evil.example/d.png) [ref] ![ref]\n\n[ref]: javascript:alert(2)\n"
         "[[nested](javascript:e)](http://evil.example/f)")


def test_markdown_export_forms_no_link_or_image(tmp_path):
    history = History(tmp_path)
    doc = _doc(text=LINKS)
    doc["conversations"][0]["title"] = "![t](http://evil.example/title.png) [u](javascript:t)"
    doc["conversations"][0]["messages"].append({"role": "assistant", "text": LINKS, "created": 2.0})
    [cid] = history.import_json(doc)
    markdown = history.export_markdown(cid)
    html, text = _rendered(markdown)
    assert "<img" not in html
    # what remains are GitHub's autolinks of bare URLs: the address itself, shown as it is, never javascript:
    anchors = re.findall(r'<a href="([^"]*)">(.*?)</a>', html, re.S)
    assert len(anchors) == html.count("<a ") and anchors
    for href, shown in anchors:
        assert href.startswith("http://") and re.sub(r"<[^>]*>", "", shown) == href, (href, shown)
    assert "![x](http://evil.example/t.png?leak=1) [click](javascript:alert(1))" in text  # the text, shown as typed
    assert "[ref]: javascript:alert(2)" in text


def test_markdown_export_keeps_ordinary_text_readable(tmp_path):
    history = History(tmp_path)
    body = "Wow! a[0] = b[1] (see \\n), done!\n\n```\nx = y[2]\n```"
    [cid] = history.import_json(_doc(text=body))
    _, text = _rendered(history.export_markdown(cid))
    assert "Wow! a[0] = b[1] (see \\n), done!" in text


# -- 5: the terminal shows no bidirectional controls -------------------------------------------------------------------
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"


@pytest.mark.parametrize("char", BIDI)
def test_bidi_and_direction_marks_are_replaced(char):
    assert printable(f"a{char}b") == "a\ufffdb"
    assert one_line(f"a{char}\nb") == "a\ufffd b"


def test_ordinary_scripts_and_joiners_are_kept():
    text = "שלום مرحبا 你好 👩\u200d💻 caf\u00e9\n\tx"
    assert printable(text) == text


def test_review_reversed_title_prints_as_written(tmp_path, capsys):
    path = tmp_path / "bidi.json"
    doc = _doc(text="\u202eabc")
    doc["conversations"][0]["title"] = "\u202egnp.exe"
    path.write_text(json.dumps(doc), encoding="utf-8")
    assert main(["history", "import", str(path)]) == 0
    for argv in (["history", "list"], ["history", "show", "1"]):
        capsys.readouterr()
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "\ufffdgnp.exe" in out and not any(c in out for c in BIDI), (argv, out)
