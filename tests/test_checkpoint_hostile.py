"""Hostile and corrupt checkpoints: each is refused with one CheckpointError line naming the file, and an export of it
publishes nothing. The files are the golden fixture, copied and then patched (bytes, pickle ops, zip entries, JSON)."""

import json
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from appliance.errors import CheckpointError
from appliance.model_config import ModelConfig
from model_export.checkpoint import INDEX_CAP, Checkpoint
from streamchat.cli import main
from tests.conftest import TINY

META = ["config.json", "tokenizer_config.json", "ice_text.model"]
SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"
QKV0 = "transformer.layers.0.attention.query_key_value.weight"  # in shard 1
LN0 = "transformer.layers.0.input_layernorm.weight"  # in shard 1, 64 fp16 values in storage "1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))


def _bin_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    for name in [*META, "pytorch_model.bin.index.json", SHARD1, SHARD2]:
        shutil.copy(TINY / name, path / name)
    return path


def _st_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir()
    for name in [*META, "model.safetensors"]:
        shutil.copy(TINY / name, path / name)
    return path


def _export(ckpt: Path, tmp_path: Path, capsys) -> str:
    """Run ``streamchat export``; it must fail with exit 2, one line, and leave no bundle or partial folder."""
    out = tmp_path / "out" / "bundle"
    assert main(["export", str(ckpt), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    return err


def _rewrite_zip(shard: Path, replace: dict[str, bytes] | None = None, deflate: tuple[str, ...] = ()) -> None:
    """Rewrite a torch zip with some entries (named without the archive's top folder) replaced or deflated."""
    with zipfile.ZipFile(shard) as old:
        entries = [(info.filename, old.read(info.filename)) for info in old.infolist()]
    with zipfile.ZipFile(shard, "w") as new:
        for name, data in entries:
            short = name.split("/", 1)[1]
            method = zipfile.ZIP_DEFLATED if short in deflate else zipfile.ZIP_STORED
            new.writestr(name, (replace or {}).get(short, data), compress_type=method)


def _data_pkl(shard: Path) -> bytes:
    with zipfile.ZipFile(shard) as archive:
        return archive.read(f"{shard.stem}/data.pkl")


def _patch_after_key(pkl: bytes, key: str, old: bytes, new: bytes) -> bytes:
    """Replace the first ``old`` pickle op after the BINUNICODE of ``key`` (torch pickles are protocol 2: unframed)."""
    at = pkl.index(key.encode())
    pos = pkl.index(old, at)
    return pkl[:pos] + new + pkl[pos + len(old):]


def _long1(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(body)]) + body


# item 3: a byte flipped in tensor data fails its zip CRC


def _flip_tensor_byte(ckpt: Path, name: str) -> None:
    ref = Checkpoint(ckpt).refs[name]
    data = bytearray(ref.file.read_bytes())
    data[ref.offset + ref.nbytes // 2] ^= 0x10
    ref.file.write_bytes(bytes(data))


def test_flipped_tensor_byte_fails_the_export_and_publishes_nothing(tmp_path, capsys):
    ckpt = _bin_ckpt(tmp_path)
    _flip_tensor_byte(ckpt, QKV0)
    err = _export(ckpt, tmp_path, capsys)
    assert f"{SHARD1}: zip entry" in err and "fails its CRC-32 check" in err and "re-copy the checkpoint" in err


def test_crc_is_checked_while_tensors_are_read_in_order(tmp_path):
    ckpt = _bin_ckpt(tmp_path)
    _flip_tensor_byte(ckpt, QKV0)
    bad = Checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=f"{SHARD1}: zip entry .* fails its CRC-32 check"):
        bad.tensor(QKV0)  # the whole entry was read: checked at its last byte, no second read
    rows = Checkpoint(ckpt).tensor_as_stored(QKV0)
    rows[0:2]  # a prefix only: nothing to compare yet
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        rows[2:rows.shape[0]]


def test_unread_entries_are_checked_at_the_end(tmp_path):
    ckpt = _bin_ckpt(tmp_path)
    _flip_tensor_byte(ckpt, QKV0)
    bad = Checkpoint(ckpt)
    bad.tensor_as_stored(QKV0)[5:6]  # a row out of order: not hashed, the final check reads the entry
    with pytest.raises(CheckpointError, match=f"{SHARD1}: zip entry .* fails its CRC-32 check"):
        bad.check_crcs()


def test_reads_in_order_leave_nothing_for_the_final_check():
    fresh = Checkpoint(TINY)
    total = sum(info.file_size for shard in (SHARD1, SHARD2) for info in zipfile.ZipFile(TINY / shard).infolist()
                if "/data/" in info.filename)
    unused = sum(ref.nbytes for name, ref in fresh.refs.items() if name.endswith("rotary_emb.inv_freq"))
    assert unused == 16 and fresh.check_crcs() == total - unused  # nothing read yet: each used entry hashed once
    ckpt = Checkpoint(TINY)
    for name in ckpt.names():
        ckpt.tensor(name)
    assert ckpt.check_crcs() == 0


# item 4: tensor byte ranges inside their storage, storages inside their file


def test_negative_storage_offset_fails_the_export(tmp_path, capsys):
    ckpt = _bin_ckpt(tmp_path)
    pkl = _patch_after_key(_data_pkl(ckpt / SHARD1), LN0, b"QK\x00", b"Q" + _long1(-32))
    _rewrite_zip(ckpt / SHARD1, {"data.pkl": pkl})
    err = _export(ckpt, tmp_path, capsys)
    assert f"{SHARD1}: tensor {LN0} has storage_offset -32" in err


@pytest.mark.parametrize("old, new, message", [
    (b"QK\x00", b"QK\x01", r"bytes \[2, 130\) of a 128-byte storage"),  # offset 1 + 64 elements > 64
    (b"K@\x85", b"K\x41\x85", r"bytes \[0, 130\) of a 128-byte storage"),  # size (65,) in a 64-element storage
    (b"K@\x85", b"\x8a\x01\xc0\x85", r"size \[-64\] and stride \[1\]"),  # size (-64,)
    (b"K@\x85", b"X\x02\x00\x00\x0064\x85", r"size \['64'\]"),  # size ('64',)
    (b"K\x01\x85", b"\x88\x85", r"stride \[True\]"),  # stride (True,)
    (b"QK\x00", b"QX\x01\x00\x00\x000", r"storage_offset '0'"),
    (b"QK\x00", b"K\x00", "does not name a storage of the zip"),  # the persistent id tuple itself as the storage
])
def test_out_of_range_tensor_geometry_is_refused(tmp_path, old, new, message):
    ckpt = _bin_ckpt(tmp_path)
    _rewrite_zip(ckpt / SHARD1, {"data.pkl": _patch_after_key(_data_pkl(ckpt / SHARD1), LN0, old, new)})
    with pytest.raises(CheckpointError, match=f"{SHARD1}: tensor {LN0} .*{message}"):
        Checkpoint(ckpt)


def test_storage_beyond_the_file_is_refused(tmp_path):
    ckpt = _bin_ckpt(tmp_path)
    data = bytearray((ckpt / SHARD1).read_bytes())
    name = f"{Path(SHARD1).stem}/data/1".encode()  # data/1 comes before data/10: its first match is its own record
    central = data.index(name, data.index(b"PK\x01\x02")) - 46  # the central directory record of storage "1"
    assert data[central:central + 4] == b"PK\x01\x02"
    data[central + 20:central + 28] = struct.pack("<II", 1 << 30, 1 << 30)  # compressed and file size: 1 GiB
    (ckpt / SHARD1).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{SHARD1}: zip entry .*data/1 .*beyond the end of the file"):
        Checkpoint(ckpt)


# item 5: data.pkl size is capped before and while inflating; tensor entries must be stored


BOMB = 192 << 20  # zeros deflate ~1000:1: a 0.2 MB shard that inflates to 192 MiB (the was 9 MB -> 6 GiB)


def _export_in_subprocess(ckpt: Path, tmp_path: Path) -> tuple[int, str, int]:
    """``streamchat export`` in a fresh process: its exit code, stderr and peak resident memory in MB."""
    script = ("import re\nfrom pathlib import Path\nfrom streamchat.cli import main\n"
              f"code = main(['export', {str(ckpt)!r}, '--out', {str(tmp_path / 'b')!r}, '--quiet'])\n"
              "peak_kb = re.search(r'VmHWM:\\s*(\\d+)', Path('/proc/self/status').read_text()).group(1)\n"
              "print(code, int(peak_kb) // 1024)\n")  # VmHWM: this process's peak, unlike ru_maxrss (kept over exec)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STREAMCHAT_CACHE_DIR": str(tmp_path / "c")})
    code, peak_mb = map(int, run.stdout.split())
    assert not (tmp_path / "b").exists()
    return code, run.stderr, peak_mb


def test_data_pkl_bomb_is_refused_before_inflating(tmp_path):
    ckpt = _bin_ckpt(tmp_path)
    pkl = _data_pkl(ckpt / SHARD1) + bytes(BOMB)  # a valid pickle, then zeros the unpickler would never read
    _rewrite_zip(ckpt / SHARD1, {"data.pkl": pkl}, deflate=("data.pkl",))
    del pkl
    assert (ckpt / SHARD1).stat().st_size < (TINY / SHARD1).stat().st_size + (1 << 20)
    code, err, peak_mb = _export_in_subprocess(ckpt, tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert f"{SHARD1}: data.pkl inflates to {len(_data_pkl(TINY / SHARD1)) + BOMB} bytes, more than the {INDEX_CAP} " \
           "allowed" in err
    assert peak_mb < 120, peak_mb  # the CLI alone peaks near 50 MB; inflating would add 192


def test_data_pkl_whose_header_lies_is_cut_at_the_cap(tmp_path):
    """A bomb declaring a small size: reading stops at the declared size (and the cap), and the CRC refuses it."""
    ckpt = _bin_ckpt(tmp_path)
    pkl = _data_pkl(ckpt / SHARD1)
    _rewrite_zip(ckpt / SHARD1, {"data.pkl": pkl + bytes(BOMB)}, deflate=("data.pkl",))
    data = bytearray((ckpt / SHARD1).read_bytes())
    for record, size_at in ((0, 22), (data.index(b"PK\x01\x02"), 24)):  # data.pkl's local header and central record
        data[record + size_at:record + size_at + 4] = struct.pack("<I", len(pkl))  # its uncompressed size
    (ckpt / SHARD1).write_bytes(bytes(data))
    del data
    code, err, peak_mb = _export_in_subprocess(ckpt, tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert f"{SHARD1}: data.pkl is corrupt (Bad CRC-32" in err and "re-copy the checkpoint" in err
    assert peak_mb < 120, peak_mb


def test_compressed_tensor_entry_is_refused(tmp_path):
    ckpt = _bin_ckpt(tmp_path)
    _rewrite_zip(ckpt / SHARD1, deflate=("data/1",))
    with pytest.raises(CheckpointError, match=f"{SHARD1}: tensor {LN0} is stored compressed .*re-save it with torch.save"):
        Checkpoint(ckpt)


# item 7: pickle entries of the wrong type


@pytest.mark.parametrize("old, new, message", [
    (b"ctorch\nHalfStorage\n", b"ctorch\nIntStorage\n", "unsupported storage type torch.IntStorage"),
    (b"ctorch._utils\n_rebuild_tensor_v2\n", b"cbuiltins\ntuple\n", "refusing to load global builtins.tuple"),
    (b"X\x07\x00\x00\x00storage", b"X\x07\x00\x00\x00storagX", "unexpected persistent id"),
])
def test_wrong_pickle_entries_are_one_line(tmp_path, old, new, message):
    ckpt = _bin_ckpt(tmp_path)
    pkl = _data_pkl(ckpt / SHARD1)
    _rewrite_zip(ckpt / SHARD1, {"data.pkl": pkl.replace(old, new, 1)})
    with pytest.raises(CheckpointError, match=f"{SHARD1}: .*{message}"):
        Checkpoint(ckpt)


def test_forged_tensor_tuples_and_odd_state_dicts(tmp_path):
    ckpt = _bin_ckpt(tmp_path)
    forged = (b"\x80\x02}(X\x03\x00\x00\x00key(X\x06\x00\x00\x00tensorK\x01tu.")  # {"key": ("tensor", 1)}
    _rewrite_zip(ckpt / SHARD1, {"data.pkl": forged})
    with pytest.raises(CheckpointError, match=f"{SHARD1} does not contain tensor"):
        Checkpoint(ckpt)  # not a tensor: ignored like any other non-tensor value
    pkl = _data_pkl(TINY / SHARD1).replace(b"X\x0e\x00\x00\x00lm_head.weight", b"K\x07", 1)  # an int key
    _rewrite_zip(ckpt / SHARD1, {"data.pkl": pkl})
    with pytest.raises(CheckpointError, match=f"{SHARD1}: a tensor is named 7, not a string"):
        Checkpoint(ckpt)
    _rewrite_zip(ckpt / SHARD1, {"data.pkl": b"\x80\x02]."})
    with pytest.raises(CheckpointError, match=f"{SHARD1}: expected a state dict, found list"):
        Checkpoint(ckpt)


# item 7: malformed shard indexes and safetensors headers


@pytest.mark.parametrize("index, message", [
    ([1, 2], "not a valid shard index (expected an object with a weight_map object)"),
    ({"weight_map": [SHARD1]}, "not a valid shard index (expected an object with a weight_map object)"),
    ({"weight_map": {QKV0: 7}}, f"weight_map entry {QKV0} must name a file in the checkpoint folder, not 7"),
    ({"weight_map": {QKV0: "../" + SHARD1}}, f"weight_map entry {QKV0} must name a file in the checkpoint folder, "
                                             f"not '../{SHARD1}'"),
    ({"weight_map": {QKV0: "/etc/passwd"}}, f"weight_map entry {QKV0} must name a file in the checkpoint folder, "
                                            "not '/etc/passwd'"),
])
def test_malformed_weight_map(tmp_path, index, message):
    ckpt = _bin_ckpt(tmp_path)
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"pytorch_model.bin.index.json: {message}")):
        Checkpoint(ckpt)


def _st_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write_st(path: Path, header, data: bytes) -> None:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def _with_entry(header: dict, name: str, entry) -> dict:
    return {**header, name: entry}


@pytest.mark.parametrize("mutate, message", [
    (lambda h: [h], "the safetensors header is not a JSON object"),
    (lambda h: _with_entry(h, LN0, [1]), f"tensor {LN0}: its entry is not an object"),
    (lambda h: _with_entry(h, LN0, {k: v for k, v in h[LN0].items() if k != "data_offsets"}),
     f"tensor {LN0}: data_offsets must be two integers"),
    (lambda h: _with_entry(h, LN0, {**h[LN0], "shape": 64}), f"tensor {LN0}: shape must be a list of"),
    (lambda h: _with_entry(h, LN0, {**h[LN0], "shape": [-64]}), f"tensor {LN0}: shape must be a list of"),
    (lambda h: _with_entry(h, LN0, {**h[LN0], "dtype": ["F16"]}), f"tensor {LN0} has unsupported dtype"),
    (lambda h: _with_entry(h, LN0, {**h[LN0], "data_offsets": [h[LN0]["data_offsets"][0] - 64,
                                                                h[LN0]["data_offsets"][0] + 64]}),
     rf"tensor {LN0}: its bytes \[\d+, \d+\) overlap tensor transformer.layers.0.input_layernorm.bias"),
    (lambda h: _with_entry(h, LN0, {**h[LN0], "data_offsets": [10**12, 10**12 + 128]}),
     rf"is truncated or damaged: tensor {LN0} has data_offsets \[{10**12}, {10**12 + 128}\] outside its"),
    (lambda h: _with_entry(h, LN0, {**h[LN0], "shape": [2**40, 2**40]}), f"tensor {LN0}: byte range .* does not match"),
])
def test_malformed_safetensors_header(tmp_path, mutate, message):
    ckpt = _st_ckpt(tmp_path)
    header, data = _st_header(ckpt / "model.safetensors")
    _write_st(ckpt / "model.safetensors", mutate(header), data)
    with pytest.raises(CheckpointError, match=f"model.safetensors:? {message}"):
        Checkpoint(ckpt)


def test_negative_safetensors_offset_is_blamed_on_the_checkpoint(tmp_path, capsys):
    ckpt = _st_ckpt(tmp_path)
    header, data = _st_header(ckpt / "model.safetensors")
    header[LN0]["data_offsets"] = [-128, 0]
    _write_st(ckpt / "model.safetensors", header, data)
    err = _export(ckpt, tmp_path, capsys)
    assert f"model.safetensors is truncated or damaged: tensor {LN0} has data_offsets [-128, 0] outside its" in err
    assert "export failed while writing" not in err


# item 7: config.json values


def _write_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((TINY / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, "num_attention_heads is 0; allowed: an integer in 1..256"),
    ({"num_layers": 10**9}, "num_layers is 1000000000; allowed: an integer in 1..256"),
    ({"max_sequence_length": 10**12}, "max_sequence_length is 1000000000000; allowed: an integer in 1..32768"),
    ({"hidden_size": float("inf")}, "hidden_size is inf; allowed: an integer in 4..32768"),
    ({"hidden_size": float("nan")}, "hidden_size is nan; allowed: an integer in 4..32768"),
    ({"hidden_size": 64.5}, "hidden_size is 64.5; allowed: an integer in 4..32768"),
    ({"hidden_size": True}, "hidden_size is True; allowed: an integer in 4..32768"),
    ({"hidden_size": "64"}, "hidden_size is '64'; allowed: an integer in 4..32768"),
    ({"vocab_size": 0}, "vocab_size is 0; allowed: an integer in 1..1048576"),
    ({"inner_hidden_size": 10**7}, "inner_hidden_size is 10000000; allowed: an integer in 1..131072"),
    ({"layernorm_epsilon": -1}, r"layernorm_epsilon is -1; allowed: a number in 1e-12..0.1"),
    ({"pad_token_id": 21069}, "pad_token_id is 21069; allowed: an integer in 0..21068"),
    ({"num_attention_heads": 3}, "hidden_size 64 does not split into 3 heads"),
])
def test_config_values_out_of_range(tmp_path, changes, message):
    ckpt = _bin_ckpt(tmp_path)
    _write_config(ckpt, **changes)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"config.json: {message}"):
        Checkpoint(ckpt)
    assert time.perf_counter() - started < 2


def test_config_1e400_and_a_list_fail_the_export(tmp_path, capsys):
    ckpt = _bin_ckpt(tmp_path)
    (ckpt / "config.json").write_text((TINY / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 1e400'))
    assert "hidden_size is inf; allowed: an integer in 4..32768" in _export(ckpt, tmp_path, capsys)
    (ckpt / "config.json").write_text("[1, 2]")
    assert "config.json: expected a JSON object of model settings, found list" in _export(ckpt, tmp_path, capsys)
    _write_config(ckpt, num_layers=10**9)
    assert "num_layers is 1000000000; allowed: an integer in 1..256" in _export(ckpt, tmp_path, capsys)


def test_config_keeps_accepting_the_fixture_the_demo_and_its_own_output():
    for path in (TINY / "config.json", ROOT / "appliance" / "demo" / "checkpoint" / "config.json"):
        cfg = ModelConfig.from_dict(json.loads(path.read_text()), str(path))
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    real = {"vocab_size": 130528, "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32,
            "inner_hidden_size": 16384, "max_sequence_length": 2048, "layernorm_epsilon": 1e-5, "bos_token_id": 130004,
            "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3}
    assert ModelConfig.from_dict({**real, "hidden_size": 4096.0}).hidden_size == 4096
    with pytest.raises(CheckpointError, match="manifest.json: missing key 'vocab_size'"):
        ModelConfig.from_dict({k: v for k, v in real.items() if k != "vocab_size"}, "manifest.json")
