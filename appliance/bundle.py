"""Open a model bundle: check its manifest, sizes and checksums, then pick the engine for its target.

``manifest.json`` is covered by ``manifest.sha256`` (its sha256, in ``sha256sum`` format) and lists every other file
with its size and sha256; every path it names must be one of those files, and a file it does not list is refused.
Sizes are checked on every open (cheap: catches truncated and missing files); the full sha256 check and the check that
every graph reads its external weights from a listed file run on the first open of a bundle and on demand. A passed
check is remembered in the user cache dir for exactly those files (path, inode, size, mtime, ctime), so their graphs are
not parsed again at every start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.conversion import CONVERT_SCRIPT, CONVERTED, CONVERTER_FOLDER, check_conversion_files, smoke_graphs
from appliance.engines import AUTO, BundleEngine, EngineOptions, open_engine
from appliance.errors import BundleError, CheckpointError
from appliance.folders import Refused, cache_dir, read_small_file
from appliance.model.weights import WEIGHT_PRECISIONS
from appliance.model_config import KV_CACHE_DTYPES, UNMARKED_KV_CACHE, ModelConfig
from appliance.targets import DECODER, STATIC, TARGETS
from appliance.tokenizer import ChatGLMTokenizer

if TYPE_CHECKING:
    import onnx

FORMAT = "streamchat-bundle"
FORMAT_VERSION = 3  # 3: cpu graphs take prefix_mask and total_length, static graphs attention_bias
MANIFEST = "manifest.json"
DIGEST = "manifest.sha256"
HASH_CHUNK = 1 << 22
MAX_MANIFEST_BYTES = 1 << 22
# a bundle path: relative, POSIX, each part starting with a letter, digit or "_" (so no "..", no hidden files)
SAFE_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
MAX_FILE_BYTES = 1 << 40


def sha256_file(path: Path, on_bytes: Callable[[int], None] = lambda n: None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            on_bytes(len(chunk))
    return digest.hexdigest()


def is_safe_path(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 255 and SAFE_PATH.fullmatch(value) is not None


def _digest_line(raw: bytes) -> bytes:
    return f"{hashlib.sha256(raw).hexdigest()}  {MANIFEST}\n".encode()


def _read_small(path: Path, limit: int) -> bytes:
    """A file the bundle format keeps small (the manifest, its digest), refused above ``limit`` bytes."""
    try:
        return read_small_file(path, limit)
    except Refused as exc:
        if exc.size is None:
            raise BundleError(f"{path} is {exc.reason}: re-copy or re-export the bundle") from exc
        raise BundleError(f"{path} is over {limit} bytes; a StreamChat manifest is far smaller: re-copy or re-export the "
                          "bundle") from exc


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``manifest.json``, then seal it."""
    (folder / MANIFEST).write_bytes(json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))
    seal_manifest(folder)


def seal_manifest(folder: Path) -> None:
    """Write ``manifest.sha256``, the digest of the folder's ``manifest.json`` (``sha256sum -c`` reads it too)."""
    (folder / DIGEST).write_bytes(_digest_line((folder / MANIFEST).read_bytes()))


def read_manifest(raw: bytes, digest: bytes | None, source: str) -> dict:
    """Parse ``raw``, check its format version, its digest and its fields; ``source`` names the bundle in errors."""
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{source}: {MANIFEST} is corrupt ({str(exc)[:100]}); re-copy or re-export the bundle") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{source}: {MANIFEST} is not a StreamChat bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{source} has bundle format version {manifest.get('format_version')!r}; this StreamChat reads "
                          f"version {FORMAT_VERSION}: re-export the bundle with this version")
    if digest is None:
        raise BundleError(f"{source} has no {DIGEST} (an incomplete copy, or exported by an older StreamChat): "
                          "re-copy or re-export the bundle")
    if digest != _digest_line(raw):
        raise BundleError(f"{source}: {MANIFEST} does not match {DIGEST} (edited or damaged): re-copy or re-export "
                          "the bundle")
    validate_manifest(manifest, f"{source}/{MANIFEST}")
    return manifest


def validate_manifest(m: dict, source: str) -> None:
    """Every field the appliance reads has the type and range it expects, and every path the manifest names is a
    listed (checksummed) file inside the bundle: one BundleError naming the field otherwise."""

    def need(ok: object, field: str, expected: str) -> None:
        if not ok:
            raise BundleError(f"{source}: {field} must be {expected}; re-export the bundle")

    def whole(value: object, low: int, high: int) -> bool:
        return type(value) is int and low <= value <= high

    files = m.get("files")
    need(isinstance(files, list) and 0 < len(files) <= 10_000, "files", "a list of {path, bytes, sha256} entries")
    for i, entry in enumerate(files):
        need(isinstance(entry, dict), f"files[{i}]", "an object with path, bytes and sha256")
        need(is_safe_path(entry.get("path")) and entry["path"] not in (MANIFEST, DIGEST), f"files[{i}].path",
             "a relative path inside the bundle")
        need(whole(entry.get("bytes"), 0, MAX_FILE_BYTES), f"files[{i}].bytes", "a whole number of bytes")
        need(isinstance(entry.get("sha256"), str) and re.fullmatch("[0-9a-f]{64}", entry["sha256"]), f"files[{i}].sha256",
             "64 lowercase hex digits")
    listed = {entry["path"] for entry in files}
    need(len(listed) == len(files), "files", "a list without repeated paths")
    need("name" not in m or (isinstance(m["name"], str) and 0 < len(m["name"]) <= 200 and m["name"].isprintable()),
         "name", "a printable one-line text of at most 200 characters")
    need(isinstance(m.get("target"), str) and m["target"] in TARGETS, "target", f"one of {', '.join(TARGETS)}")
    target = TARGETS[m["target"]]
    need(m.get("runtime") == target.runtime, "runtime", f"{target.runtime!r} for target {target.name}")
    need(isinstance(m.get("quant"), dict) and m["quant"].get("weights") in WEIGHT_PRECISIONS, "quant.weights",
         f"one of {', '.join(WEIGHT_PRECISIONS)}")
    need(isinstance(m.get("model"), dict) and isinstance(m["model"].get("config"), dict), "model.config",
         "an object (the model's config.json)")
    try:
        cfg = ModelConfig.from_dict(m["model"]["config"], source)
    except CheckpointError as exc:
        raise BundleError(str(exc)) from exc
    limit = cfg.max_sequence_length
    need(whole(m.get("max_context"), 1, limit), "max_context", f"a whole number from 1 to {limit}")
    tok = m.get("tokenizer")
    need(isinstance(tok, dict), "tokenizer", "an object with file and num_image_tokens")
    need(whole(tok.get("num_image_tokens"), 0, cfg.vocab_size - 1), "tokenizer.num_image_tokens",
         f"a whole number from 0 to {cfg.vocab_size - 1} (below model.config.vocab_size)")
    named = {"tokenizer.file": tok.get("file")}
    graphs = m.get("graphs")
    need(isinstance(graphs, dict), "graphs", "an object naming the bundle's graphs")
    if target.graphs == DECODER:
        named["graphs.decoder"] = graphs.get("decoder")
        need(graphs.get("kv_cache", UNMARKED_KV_CACHE) in tuple(KV_CACHE_DTYPES), "graphs.kv_cache",
             f"one of {', '.join(KV_CACHE_DTYPES)} (absent: {UNMARKED_KV_CACHE}, as bundles exported before it hold)")
        conversion = sorted(rel for rel in listed if rel == CONVERT_SCRIPT or rel.startswith(CONVERTER_FOLDER))
        if conversion:
            raise BundleError(f"{source}: files lists {conversion[0]}: only Ascend bundles carry convert.sh and converter/ "
                              "(and only the ones StreamChat writes); re-export the bundle")
    else:
        need(whole(graphs.get("capacity"), 1, limit), "graphs.capacity", f"a whole number from 1 to {limit}")
        gears = graphs.get("prefill_gears")
        need(isinstance(gears, list) and gears and all(whole(g, 1, graphs["capacity"]) for g in gears)
             and gears == sorted(set(gears)), "graphs.prefill_gears",
             f"ascending whole numbers from 1 to the capacity {graphs['capacity']}")
        need(graphs.get("compute") in ("fp16", "fp32"), "graphs.compute", "fp16 or fp32")
        for kind in ("device", "check"):
            need(isinstance(graphs.get(kind), dict) and graphs[kind], f"graphs.{kind}", "an object naming one graph per gear")
            named.update({f"graphs.{kind}[{key}]": rel for key, rel in graphs[kind].items()})
        for kind, suffix in CONVERTED.items():  # what convert.sh recorded
            converted = graphs.get(kind, [])
            need(isinstance(converted, list) and all(isinstance(rel, str) and rel.startswith(f"{kind}/")
                                                     and rel.endswith(suffix) for rel in converted),
                 f"graphs.{kind}", f"a list of {kind}/*{suffix} paths")
            named.update({f"graphs.{kind}[{i}]": rel for i, rel in enumerate(converted)})
    for field, rel in named.items():
        need(is_safe_path(rel), field, "a relative path inside the bundle")
        if rel not in listed:
            raise BundleError(f"{source}: {field} names {rel!r}, which is not in its files list (not checksummed); "
                              "re-export the bundle")


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"]["config"], f"{self.path / MANIFEST}")

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def files(self) -> list[dict]:
        return self.manifest["files"]

    @property
    def paths(self) -> list[str]:
        """Every file of the bundle: the manifest, its digest and the files it lists."""
        return [MANIFEST, DIGEST, *(entry["path"] for entry in self.files)]

    @property
    def label(self) -> str:
        """What the UI and CLI show as the model name."""
        name = self.manifest.get("name", "ChatGLM-6B")
        quant = self.manifest["quant"]["weights"].upper()
        demo = "DEMO · " if self.is_demo else ""
        return f"{demo}{name} · {quant} · {self.target}"

    @property
    def is_demo(self) -> bool:
        return bool(self.manifest.get("demo"))

    @classmethod
    def open(cls, path: str | Path, full_check: bool | None = None,
             on_bytes: Callable[[int], None] = lambda n: None) -> Bundle:
        """Validate and return the bundle; ``full_check`` None = hash everything and check the graphs only on the first
        open of these files, False = trust them (a bundle this process has just written or only reads the manifest of).
        ``on_bytes`` hears each chunk hashed (an install's progress bar; an exception it raises ends the open)."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle not found: {path} (no such folder): give the folder `streamchat export` wrote, "
                              "or install a bundle package with `streamchat bundle install FILE`")
        if not (path / MANIFEST).is_file():
            raise BundleError(f"{path} is not a StreamChat bundle (no {MANIFEST}); export one with `streamchat export`")
        try:
            raw = _read_small(path / MANIFEST, MAX_MANIFEST_BYTES)
            digest = _read_small(path / DIGEST, 1024) if (path / DIGEST).is_file() else None
        except OSError as exc:
            raise BundleError(f"cannot read {path / MANIFEST} ({exc.strerror or exc}); re-copy the bundle") from exc
        bundle = cls(path, read_manifest(raw, digest, str(path)))
        bundle.check_files()
        if TARGETS[bundle.target].graphs == STATIC:
            check_conversion_files(path, bundle.manifest, bundle.config)
        marker = cache_dir() / "verified" / bundle._stamp()
        if full_check or (full_check is None and not marker.exists()):
            bundle.check_checksums(on_bytes)
            bundle.check_graph_data()  # the marker names these very files: once they passed, their graphs did too
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(path))
            except OSError:
                pass  # a read-only cache only costs a re-check next time
        return bundle

    def _stamp(self) -> str:
        """Names these very files as they are now, for the "checksums passed" marker: each one's resolved path, device
        and inode (a copy, even with ``cp -a``, is other files), size, mtime and ctime (``touch -r`` can put an edited
        file's mtime back, not its ctime). Taken before hashing, so a change during the hashing misses it next time."""
        digest = hashlib.sha256()
        for rel in self.paths:
            file = (self.path / rel).resolve()
            st = file.stat()
            digest.update(f"{file}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\n".encode())
        return digest.hexdigest()

    def check_files(self) -> None:
        """Every listed file is there, inside the bundle (not through a symlink leading out) and of its listed size;
        nothing else is in the folder."""
        root = self.path.resolve()
        for entry in self.files:
            file = self.path / entry["path"]
            if not file.is_file():
                raise BundleError(f"bundle file {entry['path']} is missing from {self.path}: re-copy or re-export the bundle")
            if not file.resolve().is_relative_to(root):
                raise BundleError(f"bundle file {entry['path']} leads outside the bundle (a symlink): re-copy the bundle "
                                  "with the files themselves")
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise BundleError(f"bundle file {entry['path']} is {size} bytes but the manifest says {entry['bytes']} "
                                  "(truncated or replaced): re-copy or re-export the bundle")
        unlisted = self._unlisted()
        if unlisted:
            more = f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
            raise BundleError(f"{self.path} holds files its manifest does not list ({', '.join(unlisted[:3])}{more}): "
                              "remove them, or re-copy the bundle")

    def _unlisted(self) -> list[str]:
        allowed = set(self.paths)
        found = []
        for folder, dirs, names in os.walk(self.path):
            rel = Path(folder).relative_to(self.path)
            links = [d for d in dirs if (Path(folder) / d).is_symlink()]  # os.walk lists them but does not enter them
            found += [(rel / name).as_posix() for name in names + links if (rel / name).as_posix() not in allowed]
        return sorted(found)

    def graph_paths(self) -> list[str]:
        """The ONNX graphs the manifest names: the decoder, or an Ascend bundle's device and check graphs."""
        graphs = self.manifest["graphs"]
        if TARGETS[self.target].graphs == DECODER:
            return [graphs["decoder"]]
        return sorted({*graphs["device"].values(), *graphs["check"].values(), *smoke_graphs(graphs)})

    def check_graph_data(self) -> None:
        """Every tensor a graph keeps outside itself (ONNX external data, in subgraphs and functions too) lies in a file
        the manifest lists, within its listed size: onnxruntime before 1.24 and the INT4 prompt kernel read whatever a
        ``location`` names, absolute or ``../``. Reads the graph without its weights: 5 ms at 28 layers, most of it the
        walk (and once per process the import of onnx, 70 ms; INT4 bundles import it for their prompt kernel anyway)."""
        import onnx
        from google.protobuf.message import DecodeError

        sizes = {entry["path"]: entry["bytes"] for entry in self.files}
        for rel in self.graph_paths():
            try:
                model = onnx.load(str(self.path / rel), load_external_data=False)
            except (DecodeError, ValueError, OSError) as exc:
                raise BundleError(f"{self.path}: {rel} is not an ONNX graph ({str(exc)[:100]}); re-copy or re-export the "
                                  "bundle") from exc
            stored = _graph_tensors(model.graph), *(_node_tensors(function.node) for function in model.functions)
            for tensor in (t for tensors in stored for t in tensors):
                if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
                    self._check_external(rel, [(entry.key, entry.value) for entry in tensor.external_data], sizes)

    def _check_external(self, graph: str, pairs: list[tuple[str, str]], sizes: dict[str, int]) -> None:
        entries = dict(pairs)
        if len(entries) != len(pairs):  # readers differ in which of two locations they take
            raise BundleError(f"{self.path}: {graph} gives a tensor's external data a field twice; re-export the bundle")
        location = entries.get("location")
        if location not in sizes:  # listed paths are safe relative paths inside the bundle
            shown = location[:200] if isinstance(location, str) else location
            raise BundleError(f"{self.path}: {graph} keeps tensor data in {shown!r}, which is not a file its manifest "
                              "lists; re-export the bundle")
        offset, length = entries.get("offset", "0"), entries.get("length", "0")
        if not (re.fullmatch("[0-9]{1,15}", offset) and re.fullmatch("[0-9]{1,15}", length)):
            raise BundleError(f"{self.path}: {graph} gives tensor data in {location} an offset or length that is not a "
                              f"whole number ({offset[:20]!r}, {length[:20]!r}); re-export the bundle")
        end = int(offset) + int(length)
        if end > sizes[location]:
            raise BundleError(f"{self.path}: {graph} reads bytes {int(offset)}..{end} of {location} ({sizes[location]} "
                              "bytes); re-export the bundle")

    def check_checksums(self, on_bytes: Callable[[int], None] = lambda n: None) -> None:
        for entry in self.files:
            if sha256_file(self.path / entry["path"], on_bytes) != entry["sha256"]:
                raise BundleError(f"bundle checksum mismatch in {entry['path']}: re-export or re-copy the bundle")

    def tokenizer(self) -> ChatGLMTokenizer:
        """The bundle's tokenizer, refused when its ids (sentencepiece pieces + ``num_image_tokens``) would address rows
        past the model's embedding (the manifest alone cannot tell: it does not know the number of pieces)."""
        tok = self.manifest["tokenizer"]
        tokenizer = ChatGLMTokenizer(self.path / tok["file"], num_image_tokens=int(tok["num_image_tokens"]))
        if tokenizer.vocab_size > self.config.vocab_size:
            raise BundleError(f"{self.path}: its tokenizer has {tokenizer.vocab_size} ids but the model has "
                              f"{self.config.vocab_size} embedding rows (tokenizer.num_image_tokens is "
                              f"{tokenizer.num_image_tokens}); re-export the bundle")
        return tokenizer

    def engine(self, threads: int | None = None, kind: str = AUTO, context: int | None = None,
               kernels: bool = True, progress: Callable[[str], None] | None = None, device: str = "cpu",
               device_id: int = 0, weights: str | None = None) -> BundleEngine:
        """This bundle on the engine named ``kind`` (``appliance.engines.ENGINES``; ``auto`` = its target's runtime):
        Ascend bundles can also run on ``onnxruntime`` (their fp32-compute graphs, on the CPU). ``context`` caps a cpu
        bundle's context window below its ``max_context``: its KV cache is allocated for that many positions (32 KB
        each per layer for ChatGLM-6B). ``kernels=False`` keeps an INT4 cpu bundle on onnxruntime's graph,
        prompts and decode, instead of the C kernels (for comparison). ``progress`` hears the stages of a long load. ``device``,
        ``device_id`` and ``weights``: where the engine runs and the weight format it holds (``EngineOptions``)."""
        return open_engine(self, kind, EngineOptions(threads=threads, context=context, kernels=kernels,
                                                     progress=progress, device=device, device_id=device_id,
                                                     weights=weights))


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph stores: its initializers (sparse ones too) and its nodes' tensor attributes, subgraphs
    (If/Loop/Scan bodies) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    """The tensors nodes hold in their attributes (a ``Constant``'s value, for one), subgraphs included."""
    for node in nodes:
        for attribute in node.attribute:
            if not (attribute.HasField("t") or attribute.HasField("g") or attribute.HasField("sparse_tensor")
                    or attribute.tensors or attribute.graphs or attribute.sparse_tensors):
                continue  # numbers and strings, most attributes: skipping them halves the walk at 28 layers
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            sparse = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
            for tensor in (*sparse, *attribute.sparse_tensors):
                yield from (tensor.values, tensor.indices)
            for graph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _graph_tensors(graph)
