"""Read a ChatGLM-6B checkpoint directory tensor by tensor, without executing checkpoint code.

Formats: ``pytorch_model.bin``, sharded ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``, ``model.safetensors``
(optionally sharded with ``model.safetensors.index.json``). ``.bin`` files are torch zip archives whose pickle is read by a
restricted unpickler that knows only the tensor-rebuild globals; tensor bytes are read straight from the (uncompressed)
zip entries, a block of rows at a time when asked, so torch is never imported and a 13.7 GB checkpoint never needs
13.7 GB of RAM.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.errors import CheckpointError
from appliance.model_config import ModelConfig

_TORCH_DTYPES = {"HalfStorage": np.float16, "FloatStorage": np.float32, "BFloat16Storage": "bfloat16",
                 "DoubleStorage": np.float64}
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": "bfloat16", "F64": np.float64}
_ALLOWED_DTYPES = ("float16", "float32", "bfloat16")


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's bytes live: a file, a byte offset, a dtype and a row-major shape."""

    file: Path
    offset: int
    dtype: object  # a numpy dtype, or the string "bfloat16"
    shape: tuple[int, ...]

    @property
    def dtype_name(self) -> str:
        return self.dtype if isinstance(self.dtype, str) else np.dtype(self.dtype).name

    @property
    def nbytes(self) -> int:
        item = 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize
        return int(np.prod(self.shape, dtype=np.int64)) * item

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
        data = np.fromfile(self.ref.file, dtype=self._stored, count=count, offset=offset) if count else \
            np.empty(0, self._stored)
        if data.size != count:
            raise CheckpointError(f"{self.ref.file.name} is truncated; re-copy the checkpoint")
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


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return ("tensor", storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


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
        raise CheckpointError(f"{self.source}: refusing to load global {module}.{name} (only tensor data is allowed; "
                              "this file may contain code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r}")
        return ("storage", pid[1].name, str(pid[2]))


def _zip_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    with path.open("rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path.name}: damaged zip entry {info.filename}; re-copy the checkpoint")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_bin_index(path: Path) -> dict[str, TensorRef]:
    """Tensor references of one torch zip ``.bin`` file."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path.name} is not a readable torch zip checkpoint (truncated or corrupt?): {exc}; "
                              "re-copy it") from exc
    with archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise CheckpointError(f"{path.name}: no data.pkl inside (legacy torch format is not supported)")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            state = _RestrictedUnpickler(archive.read(pkl[0]), path.name).load()
        except CheckpointError:
            raise
        except Exception as exc:  # a malformed pickle stream: name the file, never crash
            raise CheckpointError(f"{path.name}: cannot read its tensor index ({exc})") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{path.name}: expected a state dict, found {type(state).__name__}")
        refs: dict[str, TensorRef] = {}
        for key, value in state.items():
            if not (isinstance(value, tuple) and value[0] == "tensor"):
                continue
            _, (_, storage_type, storage_key), offset, shape, stride = value
            dtype = _TORCH_DTYPES[storage_type]
            expected_stride = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
            if shape and stride != expected_stride:
                raise CheckpointError(f"{path.name}: tensor {key} is not contiguous; re-save the checkpoint")
            try:
                info = archive.getinfo(f"{prefix}data/{storage_key}")
            except KeyError as exc:
                raise CheckpointError(f"{path.name}: storage of tensor {key} is missing") from exc
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path.name}: tensor {key} is compressed; re-save it with torch.save")
            item = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
            refs[key] = TensorRef(path, _zip_data_offset(path, info) + offset * item, dtype, shape)
    return refs


def read_safetensors_index(path: Path) -> dict[str, TensorRef]:
    """Tensor references of one ``.safetensors`` file (8-byte header length, JSON header, raw data)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path.name} is truncated (no safetensors header); re-copy it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path.name}: safetensors header length {header_len} exceeds the file; re-copy it")
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as exc:
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({exc})") from exc
    refs: dict[str, TensorRef] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor {key} has unsupported dtype {meta.get('dtype')}")
        begin, end = meta["data_offsets"]
        ref = TensorRef(path, 8 + header_len + int(begin), dtype, tuple(int(s) for s in meta["shape"]))
        if end - begin != ref.nbytes:
            raise CheckpointError(f"{path.name}: tensor {key} byte range does not match its shape")
        refs[key] = ref
    return refs


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model uses, with its [out, in] shape."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.word_embeddings.weight": (cfg.vocab_size, h),
                                          "transformer.final_layernorm.weight": (h,),
                                          "transformer.final_layernorm.bias": (h,),
                                          "lm_head.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = f"transformer.layers.{n}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = (h,)
        for name, (out, inp) in cfg.linear_shapes().items():
            shapes[p + name + ".weight"] = (out, inp)
            shapes[p + name + ".bias"] = (out,)
    return shapes


class Checkpoint:
    """A validated, lazily read checkpoint: ``config``, ``names()``, ``ref(name)``, ``tensor(name)``."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.dir}")
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.dir} has no config.json: not a ChatGLM-6B checkpoint directory")
        try:
            self.raw_config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from exc
        self.config = ModelConfig.from_dict(self.raw_config, str(cfg_path))
        if not (self.dir / "ice_text.model").is_file():
            raise CheckpointError(f"{self.dir} has no ice_text.model (the ChatGLM-6B tokenizer); copy it from the "
                                  "checkpoint's repository")
        self.refs = self._index()
        if "lm_head.weight" not in self.refs and "transformer.word_embeddings.weight" in self.refs:
            self.refs["lm_head.weight"] = self.refs["transformer.word_embeddings.weight"]  # tied, as HF ties them
        self._validate()

    def _index(self) -> dict[str, TensorRef]:
        for index_name, reader in (("model.safetensors.index.json", read_safetensors_index),
                                   ("pytorch_model.bin.index.json", read_bin_index)):
            index_path = self.dir / index_name
            if index_path.is_file():
                try:
                    weight_map: dict[str, str] = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                except (ValueError, KeyError) as exc:
                    raise CheckpointError(f"{index_path.name}: not a valid shard index ({exc})") from exc
                refs: dict[str, TensorRef] = {}
                for shard in sorted(set(weight_map.values())):
                    shard_path = self.dir / shard
                    if not shard_path.is_file():
                        raise CheckpointError(f"shard {shard} listed in {index_name} is missing from {self.dir}")
                    shard_refs = reader(shard_path)
                    for key, file in weight_map.items():
                        if file == shard:
                            if key not in shard_refs:
                                raise CheckpointError(f"{shard} does not contain tensor {key} promised by {index_name}")
                            refs[key] = shard_refs[key]
                return refs
        if (self.dir / "model.safetensors").is_file():
            return read_safetensors_index(self.dir / "model.safetensors")
        if (self.dir / "pytorch_model.bin").is_file():
            return read_bin_index(self.dir / "pytorch_model.bin")
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

    def lm_head_is_tied(self) -> bool:
        """True when lm_head and the embedding share storage or hold equal values (then a bundle stores one)."""
        a, b = self.refs["lm_head.weight"], self.refs["transformer.word_embeddings.weight"]
        if a == b:
            return True
        head, emb = a.load(), b.load()
        return all(np.array_equal(head[r:r + 8192], emb[r:r + 8192]) for r in range(0, head.shape[0], 8192))
