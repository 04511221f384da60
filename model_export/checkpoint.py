"""Read a ChatGLM-6B checkpoint directory tensor by tensor, without executing checkpoint code.

Formats: ``pytorch_model.bin``, sharded ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``, ``model.safetensors``
(optionally sharded with ``model.safetensors.index.json``). ``.bin`` files are torch zip archives whose pickle is read by a
restricted unpickler that knows only the tensor-rebuild globals; tensor bytes are read straight from the (uncompressed)
zip entries, a block of rows at a time when asked, so torch is never imported and a 13.7 GB checkpoint never needs
13.7 GB of RAM.

Every file is untrusted: the zip directory's entry count and size are capped before ``zipfile`` reads it, each index
entry is type-checked, every tensor's byte range must lie inside its storage and every storage inside its file,
data.pkl may not inflate beyond ``INDEX_CAP``, and the zip CRC-32 of each tensor entry is computed as the tensor's bytes
are read (``check_crcs`` hashes what the reads skipped). Any violation is a ``CheckpointError`` naming the file, quoting
untrusted values only through ``appliance.display.quoted``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from appliance.display import quoted
from appliance.errors import CheckpointError
from appliance.folders import Refused, read_small_file
from appliance.model.weights import EMBEDDING, LM_HEAD, expected_shapes
from appliance.model_config import ModelConfig

_TORCH_DTYPES = {"HalfStorage": np.float16, "FloatStorage": np.float32, "BFloat16Storage": "bfloat16",
                 "DoubleStorage": np.float64}
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": "bfloat16", "F64": np.float64}
_ALLOWED_DTYPES = ("float16", "float32", "bfloat16")
# The tensor index of the whole ChatGLM-6B checkpoint (data.pkl, or a safetensors header) is ~50 KB: 339 tensors of
# ~150 bytes. Parsing costs up to ~70 bytes of memory per pickle byte (an object per one-byte opcode) and ~20 per JSON
# byte, so 4 MiB keeps a hostile index under ~300 MB while leaving 80x headroom over the real one. The same cap bounds
# config.json, the shard indexes and a .bin file's zip directory.
INDEX_CAP = 4 << 20
# A checkpoint shard's zip holds a few hundred entries (one per storage, data.pkl, version records) in a directory of
# ~100 bytes per entry. zipfile builds a ZipInfo of ~500 bytes per entry while it reads the directory, so both are capped
# before it starts: at most INDEX_CAP bytes and MAX_ZIP_ENTRIES entries, ~50 MB at worst.
MAX_ZIP_ENTRIES = 65536
MAX_DIMS = 8
INT64_LIMIT = 1 << 63  # offsets, sizes and strides are int64 in torch
_HASH_CHUNK = 16 << 20


@dataclass(eq=False)
class ZipEntryCrc:
    """A stored zip entry (bytes [start, start + size) of ``file``) and its CRC-32 from the zip directory.

    Reads that pass over the entry front to back extend a running CRC, so a tensor the export reads in order is checked
    at its last byte without a second read; ``finish`` hashes only what no read has passed over yet.
    """

    file: Path
    name: str
    start: int
    size: int
    crc: int
    hashed: int = 0
    running: int = 0

    def observe(self, offset: int, data: bytes | np.ndarray) -> None:
        """Account for bytes just read at ``offset`` of the file (a uint8 view or bytes)."""
        frontier = self.start + self.hashed
        end = min(offset + len(data), self.start + self.size)
        if offset <= frontier < end:
            self.running = zlib.crc32(data[frontier - offset:end - offset], self.running)
            self.hashed = end - self.start
            if self.hashed == self.size:
                self._compare()

    def finish(self) -> int:
        """Hash the rest of the entry and compare; returns how many bytes that took."""
        todo = self.size - self.hashed
        with self.file.open("rb") as fh:
            while self.hashed < self.size:
                at = self.start + self.hashed
                fh.seek(at)
                chunk = fh.read(min(_HASH_CHUNK, self.size - self.hashed))
                if not chunk:
                    raise CheckpointError(f"{self.file.name} is truncated inside zip entry {self.name}; re-copy the "
                                          "checkpoint")
                self.observe(at, chunk)
        self._compare()
        return todo

    def _compare(self) -> None:
        if self.running != self.crc:
            raise CheckpointError(f"{self.file.name}: zip entry {self.name} fails its CRC-32 check (the file is "
                                  "corrupt); re-copy the checkpoint")


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's bytes live: a file, a byte offset, a dtype and a row-major shape."""

    file: Path
    offset: int
    dtype: object  # a numpy dtype, or the string "bfloat16"
    shape: tuple[int, ...]
    crc: ZipEntryCrc | None = field(default=None, compare=False)  # the zip entry holding the bytes (.bin files)

    @property
    def dtype_name(self) -> str:
        return self.dtype if isinstance(self.dtype, str) else np.dtype(self.dtype).name

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    def load(self) -> StoredTensor:
        size = self.file.stat().st_size
        if self.offset + self.nbytes > size:
            raise CheckpointError(f"{self.file.name} is truncated: a tensor needs bytes up to {self.offset + self.nbytes}, "
                                  f"the file has {size}; re-copy the checkpoint")
        return StoredTensor(self)


class StoredTensor:
    """A checkpoint tensor read on demand, whole or a block of rows at a time, into ordinary memory.

    Reading with pread instead of keeping a memory map means a pass over a 1 GB table never leaves 1 GB of file pages
    mapped into the exporter: its resident memory is what it is working on, nothing more.
    """

    def __init__(self, ref: TensorRef) -> None:
        self.ref = ref
        self.shape = ref.shape
        self.ndim = len(ref.shape)
        self.size = int(np.prod(ref.shape, dtype=np.int64))
        self.dtype = np.dtype(np.float32 if ref.dtype == "bfloat16" else ref.dtype)
        self._stored = np.dtype(np.uint16 if ref.dtype == "bfloat16" else ref.dtype)
        self._row = int(np.prod(ref.shape[1:], dtype=np.int64))

    def _read(self, first_row: int, rows: int) -> np.ndarray:
        count = rows * self._row
        offset = self.ref.offset + first_row * self._row * self._stored.itemsize
        try:
            data = np.fromfile(self.ref.file, dtype=self._stored, count=count, offset=offset) if count else \
                np.empty(0, self._stored)
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.ref.file}: {exc.strerror or exc}") from exc
        if data.size != count:
            raise CheckpointError(f"{self.ref.file.name} is truncated; re-copy the checkpoint")
        if self.ref.crc is not None and count:
            self.ref.crc.observe(offset, data.view(np.uint8))
        if self.ref.dtype == "bfloat16":
            data = (data.astype(np.uint32) << 16).view(np.float32)
        return data.reshape((rows, *self.shape[1:]) if self.ndim else ())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        data = self._read(0, self.shape[0] if self.ndim else 1)
        return data if dtype is None else data.astype(dtype, copy=False)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice) and key.step in (None, 1) and self.ndim:
            start, stop, _ = key.indices(self.shape[0])
            return self._read(start, max(0, stop - start))
        if isinstance(key, np.ndarray) and key.dtype.kind in "iu" and self.ndim:
            flat = key.reshape(-1)
            rows = np.stack([self._read(int(i), 1)[0] for i in flat]) if flat.size else self._read(0, 0)
            return rows.reshape(*key.shape, *self.shape[1:])
        return np.asarray(self)[key]


def _itemsize(dtype: object) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


@dataclass(frozen=True)
class _Storage:
    """A persistent id the unpickler accepted; ``key`` is pickle data, checked where it is used."""

    type_name: str
    key: object


@dataclass(frozen=True)
class _TensorRecord:
    """A ``_rebuild_tensor_v2`` call's arguments, unchecked (a pickle cannot forge this class, only fill it)."""

    storage: object
    offset: object
    size: object
    stride: object


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRecord(storage, storage_offset, size, stride)


def _rebuild_parameter(tensor, *_ignored):
    return tensor


class _RestrictedUnpickler(pickle.Unpickler):
    """Knows tensor rebuilding and OrderedDict; any other global is refused before it can run."""

    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                ("collections", "OrderedDict"): dict}

    def __init__(self, data: bytes, source: str) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_DTYPES:
            return _StorageType(name)
        if module == "torch" and name.endswith("Storage"):
            raise CheckpointError(f"{self.source}: unsupported storage type torch.{name} (supported: "
                                  f"{', '.join(_TORCH_DTYPES)})")
        raise CheckpointError(f"{self.source}: refusing to load global {module}.{name} (only tensor data is allowed; "
                              "this file may contain code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.source}: unexpected persistent id {quoted(pid)}")
        return _Storage(pid[1].name, pid[2])


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQ2H2I4Q")  # zip64 end of central directory record, without extensible data


def _zip_directory_extent(fh: BinaryIO) -> tuple[int, int] | None:
    """(entries, bytes) of the zip's central directory as its end records declare them, found the way ``zipfile`` finds
    them; None when there is no end record (``zipfile`` then refuses the file itself)."""
    size = fh.seek(0, os.SEEK_END)
    tail_start = max(0, size - (1 << 16) - _EOCD.size)
    fh.seek(tail_start)
    tail = fh.read()
    at = len(tail) - _EOCD.size  # the record at the very end when it has no comment, else the last one in the tail
    if not (at >= 0 and tail[at:at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        return None
    _, _, _, _, entries, directory, _, _ = _EOCD.unpack_from(tail, at)
    eocd = tail_start + at
    if eocd < _ZIP64_LOCATOR.size:
        return entries, directory
    fh.seek(eocd - _ZIP64_LOCATOR.size)
    signature, _, located, _ = _ZIP64_LOCATOR.unpack(fh.read(_ZIP64_LOCATOR.size))
    if signature != b"PK\x06\x07":
        return entries, directory
    # zipfile reads the zip64 record just before the locator (3.11) or where the locator points (later versions)
    extents = []
    for record in {eocd - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size, located}:
        if 0 <= record <= size - _ZIP64_EOCD.size:
            fh.seek(record)
            signature, _, _, _, _, _, _, entries64, directory64, _ = _ZIP64_EOCD.unpack(fh.read(_ZIP64_EOCD.size))
            if signature == b"PK\x06\x06":
                extents.append((entries64, directory64))
    return (max(e for e, _ in extents), max(d for _, d in extents)) if extents else (entries, directory)


def _check_zip_directory(path: Path, fh: BinaryIO) -> None:
    """Refuse a zip whose central directory is too big, before ``zipfile`` reads all of it into memory (a 108 MB file
    of 2 million entries took it 18 s and 1.17 GB)."""
    entries, directory = _zip_directory_extent(fh) or (0, 0)
    if entries > MAX_ZIP_ENTRIES:
        raise CheckpointError(f"{path.name}: its zip directory lists {entries} entries, more than the {MAX_ZIP_ENTRIES} "
                              "allowed (a checkpoint shard has a few hundred); this is not a usable checkpoint")
    if directory > INDEX_CAP:
        raise CheckpointError(f"{path.name}: its zip directory is {directory} bytes, more than the {INDEX_CAP} allowed "
                              "(a checkpoint shard's is under 100 KB); this is not a usable checkpoint")


def _zip_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    with path.open("rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path.name}: damaged zip entry {info.filename}; re-copy the checkpoint")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _read_data_pkl(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    """data.pkl, refused before inflating when its declared size is over the cap, and cut at the cap while inflating
    (the declared size may lie)."""
    declared = archive.getinfo(name).file_size
    too_big = f"{path.name}: data.pkl inflates to {{}} bytes, more than the {INDEX_CAP} allowed (a ChatGLM-6B " \
              "tensor index is under 100 KB); this is not a usable checkpoint"
    if declared > INDEX_CAP:
        raise CheckpointError(too_big.format(declared))
    try:
        with archive.open(name) as fh:
            data = fh.read(INDEX_CAP + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: data.pkl is corrupt ({exc}); re-copy the checkpoint") from exc
    if len(data) > INDEX_CAP:
        raise CheckpointError(too_big.format(f"more than {len(data)}"))
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return _is_int(value) and 0 <= value < INT64_LIMIT


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, tuple | list) else value


def _storage_entry(path: Path, archive: zipfile.ZipFile, name: str, where: str) -> ZipEntryCrc:
    """The stored zip entry ``name``, checked to lie inside the file."""
    try:
        info = archive.getinfo(name)
    except KeyError as exc:
        raise CheckpointError(f"{where}: its storage {name} is missing from the zip") from exc
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{where} is stored compressed in the zip; re-save it with torch.save")
    start, size = _zip_data_offset(path, info), path.stat().st_size
    if info.compress_size != info.file_size or start + info.file_size > size:
        raise CheckpointError(f"{path.name}: zip entry {name} ({info.file_size} bytes at {start}) extends beyond the end "
                              f"of the file ({size} bytes) or is damaged; re-copy the checkpoint")
    return ZipEntryCrc(path, name, start, info.file_size, info.CRC)


def _bin_ref(path: Path, archive: zipfile.ZipFile, prefix: str, key: str, record: _TensorRecord,
             entries: dict[str, ZipEntryCrc]) -> TensorRef:
    """A tensor's reference after checking its storage, offset, size and stride against its storage entry."""
    where = f"{path.name}: tensor {key}"
    storage, offset, size, stride = record.storage, record.offset, record.size, record.stride
    if not (isinstance(storage, _Storage) and isinstance(storage.key, str)):
        raise CheckpointError(f"{where} does not name a storage of the zip")
    # a BUILD opcode can rewrite the storage type's name after find_class accepted it
    dtype = _TORCH_DTYPES.get(storage.type_name) if isinstance(storage.type_name, str) else None
    if dtype is None:
        raise CheckpointError(f"{where} has unsupported storage type {quoted(storage.type_name)} (supported: "
                              f"{', '.join(_TORCH_DTYPES)})")
    if not (_is_count(offset) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and len(size) <= MAX_DIMS and all(_is_count(n) for n in size + stride)):
        raise CheckpointError(f"{where} has storage_offset {quoted(offset)}, size {quoted(_as_list(size))} and stride "
                              f"{quoted(_as_list(stride))}; expected non-negative integers below 2**63 (at most "
                              f"{MAX_DIMS} dimensions)")
    if size and stride != tuple(math.prod(size[i + 1:]) for i in range(len(size))):
        raise CheckpointError(f"{where} is not contiguous; re-save the checkpoint")
    name = f"{prefix}data/{storage.key}"
    if name not in entries:
        entries[name] = _storage_entry(path, archive, name, where)
    entry = entries[name]
    begin = offset * _itemsize(dtype)
    end = begin + math.prod(size) * _itemsize(dtype)
    if end > entry.size:
        raise CheckpointError(f"{where} needs bytes [{begin}, {end}) of a {entry.size}-byte storage; the file is "
                              "damaged or hostile")
    return TensorRef(path, entry.start + begin, dtype, size, entry)


def read_bin_index(path: Path) -> dict[str, TensorRef]:
    """Tensor references of one torch zip ``.bin`` file."""
    with path.open("rb") as fh:
        _check_zip_directory(path, fh)
        try:
            archive = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:  # damaged names, version fields
            raise CheckpointError(f"{path.name} is not a readable torch zip checkpoint (truncated or corrupt?): {exc}; "
                                  "re-copy it") from exc
        with archive:
            return _bin_refs(path, archive)


def _bin_refs(path: Path, archive: zipfile.ZipFile) -> dict[str, TensorRef]:
    """The tensor references of a zip's data.pkl, each checked against the zip (``_bin_ref``)."""
    pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise CheckpointError(f"{path.name}: no data.pkl inside (legacy torch format is not supported)")
    prefix = pkl[0][: -len("data.pkl")]
    try:
        state = _RestrictedUnpickler(_read_data_pkl(path, archive, pkl[0]), path.name).load()
    except CheckpointError:
        raise
    except Exception as exc:  # a malformed pickle stream: name the file, never crash
        raise CheckpointError(f"{path.name}: cannot read its tensor index ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name}: expected a state dict, found {type(state).__name__}")
    refs: dict[str, TensorRef] = {}
    entries: dict[str, ZipEntryCrc] = {}
    for key, value in state.items():
        if not isinstance(value, _TensorRecord):
            continue
        if not isinstance(key, str):
            raise CheckpointError(f"{path.name}: a tensor is named {quoted(key)}, not a string")
        refs[key] = _bin_ref(path, archive, prefix, key, value, entries)
    return refs


def _safetensors_ref(path: Path, key: str, meta: object, data_start: int, data_size: int) -> TensorRef:
    """A tensor's reference after checking its header entry's types and that its bytes lie in the data section."""
    where = f"{path.name}: tensor {key}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: its entry is not an object")
    name = meta.get("dtype")
    dtype = _SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CheckpointError(f"{where} has unsupported dtype {quoted(name)}")
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_count(n) for n in shape)):
        raise CheckpointError(f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers below 2**63, "
                              f"not {quoted(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) for n in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be two integers, not {quoted(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(f"{path.name} is truncated or damaged: tensor {key} has data_offsets [{begin}, {end}] "
                              f"outside its {data_size}-byte data section; re-copy the checkpoint")
    ref = TensorRef(path, data_start + begin, dtype, tuple(shape))
    if end - begin != ref.nbytes:
        raise CheckpointError(f"{where}: byte range [{begin}, {end}) does not match its shape {shape} and dtype {name}")
    return ref


def read_safetensors_index(path: Path) -> dict[str, TensorRef]:
    """Tensor references of one ``.safetensors`` file (8-byte header length, JSON header, raw data)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path.name} is truncated (no safetensors header); re-copy it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path.name}: safetensors header length {header_len} exceeds the file; re-copy it")
        if header_len > INDEX_CAP:
            raise CheckpointError(f"{path.name}: safetensors header of {header_len} bytes, more than the {INDEX_CAP} "
                                  "allowed (a ChatGLM-6B header is under 100 KB); this is not a usable checkpoint")
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: the safetensors header is not a JSON object; re-copy the checkpoint")
    refs = {key: _safetensors_ref(path, key, meta, 8 + header_len, size - 8 - header_len)
            for key, meta in header.items() if key != "__metadata__"}
    previous = None
    for key, ref in sorted(refs.items(), key=lambda item: item[1].offset):
        if previous is not None and ref.nbytes and ref.offset < previous[1].offset + previous[1].nbytes:
            raise CheckpointError(f"{path.name}: tensor {key}: its bytes [{ref.offset}, {ref.offset + ref.nbytes}) "
                                  f"overlap tensor {previous[0]}")
        if ref.nbytes:
            previous = (key, ref)
    return refs


def _read_json(path: Path) -> object:
    """A small JSON file (config.json, a shard index), size-capped before reading."""
    try:
        return json.loads(read_small_file(path, INDEX_CAP).decode("utf-8"))
    except Refused as exc:
        if exc.size is None:
            raise CheckpointError(f"{path}: {exc.reason}") from exc
        raise CheckpointError(f"{path}: {exc.size} bytes, more than the {INDEX_CAP} allowed for this file") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def _read_weights(reader: Callable[[Path], dict[str, TensorRef]], path: Path) -> dict[str, TensorRef]:
    try:
        return reader(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _weight_map(index_path: Path) -> dict[str, str]:
    """The shard index's tensor -> file map; every file must be a plain name inside the checkpoint folder."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path.name}: not a valid shard index (expected an object with a weight_map object)")
    for key, file in weight_map.items():
        if not (isinstance(file, str) and file == Path(file).name and file not in ("", ".", "..")):
            raise CheckpointError(f"{index_path.name}: weight_map entry {key} must name a file in the checkpoint folder, "
                                  f"not {quoted(file)}")
    return weight_map


class Checkpoint:
    """A validated, lazily read checkpoint: ``config``, ``names()``, ``ref(name)``, ``tensor(name)``."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.dir}")
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.dir} has no config.json: not a ChatGLM-6B checkpoint directory")
        self.raw_config = _read_json(cfg_path)
        self.config = ModelConfig.from_dict(self.raw_config, str(cfg_path))
        if not (self.dir / "ice_text.model").is_file():
            raise CheckpointError(f"{self.dir} has no ice_text.model (the ChatGLM-6B tokenizer); copy it from the "
                                  "checkpoint's repository")
        self.refs = self._index()
        if LM_HEAD not in self.refs and EMBEDDING in self.refs:
            self.refs[LM_HEAD] = self.refs[EMBEDDING]  # tied, as HF ties them
        self._validate()

    def _index(self) -> dict[str, TensorRef]:
        for index_name, reader in (("model.safetensors.index.json", read_safetensors_index),
                                   ("pytorch_model.bin.index.json", read_bin_index)):
            index_path = self.dir / index_name
            if index_path.is_file():
                weight_map = _weight_map(index_path)
                refs: dict[str, TensorRef] = {}
                for shard in sorted(set(weight_map.values())):
                    shard_path = self.dir / shard
                    if not shard_path.is_file():
                        raise CheckpointError(f"shard {shard} listed in {index_name} is missing from {self.dir}")
                    shard_refs = _read_weights(reader, shard_path)
                    for key, file in weight_map.items():
                        if file == shard:
                            if key not in shard_refs:
                                raise CheckpointError(f"{shard} does not contain tensor {key} promised by {index_name}")
                            refs[key] = shard_refs[key]
                return refs
        for name, reader in (("model.safetensors", read_safetensors_index), ("pytorch_model.bin", read_bin_index)):
            if (self.dir / name).is_file():
                return _read_weights(reader, self.dir / name)
        raise CheckpointError(f"{self.dir} has no weights (pytorch_model*.bin or model.safetensors)")

    def _validate(self) -> None:
        if any(k.endswith("weight_scale") for k in self.refs):
            raise CheckpointError(f"{self.dir}: a THUDM pre-quantized checkpoint; export from the fp16 original")
        for name, shape in expected_shapes(self.config).items():
            ref = self.refs.get(name)
            if ref is None:
                raise CheckpointError(f"{self.dir}: tensor {name} is missing from the checkpoint")
            if ref.shape != shape:
                raise CheckpointError(f"{ref.file.name}: tensor {name} has shape {list(ref.shape)}, config.json implies "
                                      f"{list(shape)}; checkpoint and config.json do not belong together")
            if ref.dtype_name not in _ALLOWED_DTYPES:
                raise CheckpointError(f"{ref.file.name}: tensor {name} has dtype {ref.dtype_name}")
            end = ref.offset + ref.nbytes
            if end > ref.file.stat().st_size:
                raise CheckpointError(f"{ref.file.name} is truncated: tensor {name} ends at byte {end}, the file has "
                                      f"{ref.file.stat().st_size}; re-copy the checkpoint")

    def names(self) -> Iterator[str]:
        return iter(expected_shapes(self.config))

    def tensor(self, name: str, dtype: type = np.float32) -> np.ndarray:
        """One tensor, read whole, as ``dtype``."""
        return np.asarray(self.refs[name].load(), dtype=dtype)

    def tensor_as_stored(self, name: str) -> StoredTensor:
        """One tensor in its stored dtype (bf16 widened to fp32), read only as its rows are asked for."""
        return self.refs[name].load()

    def stored_tensors(self) -> dict[str, StoredTensor]:
        """Every tensor as a ``StoredTensor``, for code that reads rows of big tables without a full copy."""
        return {name: self.refs[name].load() for name in self.names()}

    def check_crcs(self) -> int:
        """Finish the zip CRC-32 check of every tensor the model uses (safetensors files carry no checksums).

        Reads in order have already hashed what they passed over, so after an export this reads only entries (or
        their tails) that were skipped or read out of order. Returns the number of bytes it had to read."""
        entries = {id(ref.crc): ref.crc for name in self.names() if (ref := self.refs[name]).crc is not None}
        try:
            return sum(entry.finish() for entry in entries.values())
        except OSError as exc:
            raise CheckpointError(f"cannot read a checkpoint file: {exc}") from exc

    def lm_head_is_tied(self) -> bool:
        """True when lm_head and the embedding share storage or hold equal values (then a bundle stores one)."""
        a, b = self.refs[LM_HEAD], self.refs[EMBEDDING]
        if a == b:
            return True
        head, emb = a.load(), b.load()
        return all(np.array_equal(head[r:r + 8192], emb[r:r + 8192]) for r in range(0, head.shape[0], 8192))
