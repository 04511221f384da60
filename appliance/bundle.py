"""Open a model bundle: check its manifest, sizes and checksums, then pick the engine for its target.

``manifest.json`` is covered by ``manifest.sha256`` (its sha256, in ``sha256sum`` format) and lists every other file
with its size and sha256; every path it names must be one of those files, and a file it does not list is refused.
Sizes are checked on every open (cheap: catches truncated and missing files); the full sha256 check runs on the first
open of a bundle (remembered by manifest hash, file sizes and mtimes in the user cache dir) and on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import BundleError, CheckpointError
from appliance.folders import cache_dir
from appliance.model_config import ModelConfig
from appliance.tokenizer import ChatGLMTokenizer

FORMAT = "streamchat-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
DIGEST = "manifest.sha256"
HASH_CHUNK = 1 << 22
MAX_MANIFEST_BYTES = 1 << 22
RUNTIMES = {"cpu": "onnxruntime", "ascend-910b": "mindspore-lite", "ascend-310b": "mindspore-lite"}
WEIGHTS = ("int4", "int8", "fp16", "fp32")  # the weight precisions an export writes
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
    with path.open("rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path} is over {limit} bytes; a StreamChat manifest is far smaller: re-copy or re-export the bundle")
    return data


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
    need(m.get("target") in RUNTIMES, "target", f"one of {', '.join(RUNTIMES)}")
    need(m.get("runtime") == RUNTIMES[m["target"]], "runtime", f"{RUNTIMES[m['target']]!r} for target {m['target']}")
    need(isinstance(m.get("quant"), dict) and m["quant"].get("weights") in WEIGHTS, "quant.weights",
         f"one of {', '.join(WEIGHTS)}")
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
    need(whole(tok.get("num_image_tokens"), 0, 1_000_000), "tokenizer.num_image_tokens", "a whole number from 0 to 1000000")
    named = {"tokenizer.file": tok.get("file")}
    graphs = m.get("graphs")
    need(isinstance(graphs, dict), "graphs", "an object naming the bundle's graphs")
    if m["runtime"] == "onnxruntime":
        named["graphs.decoder"] = graphs.get("decoder")
    else:
        need(whole(graphs.get("capacity"), 1, limit), "graphs.capacity", f"a whole number from 1 to {limit}")
        gears = graphs.get("prefill_gears")
        need(isinstance(gears, list) and gears and all(whole(g, 1, graphs["capacity"]) for g in gears)
             and gears == sorted(set(gears)), "graphs.prefill_gears",
             f"ascending whole numbers from 1 to the capacity {graphs['capacity']}")
        batches = graphs.get("batch_gears")
        need(isinstance(batches, list) and batches and all(whole(b, 1, 64) for b in batches), "graphs.batch_gears",
             "a list of whole numbers from 1 to 64")
        need(graphs.get("compute") in ("fp16", "fp32"), "graphs.compute", "fp16 or fp32")
        for kind in ("device", "check"):
            need(isinstance(graphs.get(kind), dict) and graphs[kind], f"graphs.{kind}", "an object naming one graph per gear")
            named.update({f"graphs.{kind}[{key}]": rel for key, rel in graphs[kind].items()})
        mindir = graphs.get("mindir", [])
        need(isinstance(mindir, list), "graphs.mindir", "a list of paths")
        named.update({f"graphs.mindir[{i}]": rel for i, rel in enumerate(mindir)})
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
    def open(cls, path: str | Path, full_check: bool | None = None) -> Bundle:
        """Validate and return the bundle; ``full_check`` None = hash everything only on the first open."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle not found: {path}")
        if not (path / MANIFEST).is_file():
            raise BundleError(f"{path} is not a StreamChat bundle (no {MANIFEST}); export one with `streamchat export`")
        try:
            raw = _read_small(path / MANIFEST, MAX_MANIFEST_BYTES)
            digest = _read_small(path / DIGEST, 1024) if (path / DIGEST).is_file() else None
        except OSError as exc:
            raise BundleError(f"cannot read {path / MANIFEST} ({exc.strerror or exc}); re-copy the bundle") from exc
        bundle = cls(path, read_manifest(raw, digest, str(path)))
        bundle.check_files()
        if bundle.manifest["runtime"] == "mindspore-lite":
            from model_export.ascend_targets import check_conversion_files

            check_conversion_files(path, bundle.manifest, bundle.config)
        marker = cache_dir() / "verified" / bundle._stamp(raw)
        if full_check or (full_check is None and not marker.exists()):
            bundle.check_checksums()
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(path))
            except OSError:
                pass  # a read-only cache only costs a re-check next time
        return bundle

    def _stamp(self, manifest_bytes: bytes) -> str:
        digest = hashlib.sha256(manifest_bytes)
        for entry in self.files:
            st = (self.path / entry["path"]).stat()
            digest.update(f"{entry['path']}:{st.st_size}:{st.st_mtime_ns}".encode())
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

    def check_checksums(self, on_bytes: Callable[[int], None] = lambda n: None) -> None:
        for entry in self.files:
            if sha256_file(self.path / entry["path"], on_bytes) != entry["sha256"]:
                raise BundleError(f"bundle checksum mismatch in {entry['path']}: re-export or re-copy the bundle")

    def tokenizer(self) -> ChatGLMTokenizer:
        tok = self.manifest["tokenizer"]
        return ChatGLMTokenizer(self.path / tok["file"], num_image_tokens=int(tok["num_image_tokens"]))

    def engine(self, threads: int | None = None, kind: str = "auto", context: int | None = None,
               prompt_kernel: bool = True):
        """The engine for this bundle: ``auto`` = its runtime; Ascend bundles can also run on ``onnxruntime`` (their
        fp32-compute graphs, on the CPU) or on ``mindspore-lite`` here (CPU) or on the NPU
        (``STREAMCHAT_LITE_DEVICE=ascend``). ``context`` caps a cpu bundle's context window below its ``max_context``:
        its KV cache is allocated for that many positions (32 KB each per layer for ChatGLM-6B). ``prompt_kernel=False``
        keeps an INT4 cpu bundle's prompts in the graph instead of the AVX2 kernel (for comparison)."""
        runtime = self.manifest.get("runtime")
        kind = runtime if kind == "auto" else kind
        graphs = self.manifest["graphs"]
        if runtime == "onnxruntime" and kind == "onnxruntime":
            from appliance.engines.onnxruntime import OrtEngine

            limit = int(self.manifest["max_context"])
            return OrtEngine(self.path / graphs["decoder"], self.config, min(limit, context or limit), threads=threads,
                             prompt_kernel=prompt_kernel)
        if runtime == "mindspore-lite" and kind in ("onnxruntime", "mindspore-lite"):
            from appliance.engines.static import OrtGraphRunner, StaticEngine

            device = os.environ.get("STREAMCHAT_LITE_DEVICE", "cpu")
            files = {name: str(self.path / rel) for name, rel in
                     graphs["device" if kind == "mindspore-lite" and device == "ascend" else "check"].items()}
            if kind == "onnxruntime":
                runner = OrtGraphRunner(files, threads)
            else:
                from appliance.engines.mindspore_lite import LiteStepServer

                stamp = hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()[:16]
                runner = LiteStepServer(files, cache_dir() / "mindir" / f"{stamp}-{device}", self.config.vocab_size,
                                        device=device, threads=threads,
                                        device_id=int(os.environ.get("STREAMCHAT_LITE_DEVICE_ID", "0")))
            return StaticEngine(kind, self.config, int(graphs["capacity"]), list(graphs["prefill_gears"]), runner,
                                self.tokenizer().special.pad)
        raise BundleError(f"{self.path} targets {self.target} (runtime {runtime}); it cannot run on engine {kind}")
