"""Open a model bundle: check its manifest, sizes and checksums, then pick the engine for its target.

Sizes are checked on every open (cheap: catches truncated and missing files); the full sha256 check runs on the first
open of a bundle (remembered by manifest hash, file sizes and mtimes in the user cache dir) and on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import BundleError
from appliance.model_config import ModelConfig
from appliance.tokenizer import ChatGLMTokenizer

FORMAT = "streamchat-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
HASH_CHUNK = 1 << 22


def sha256_file(path: Path, on_bytes: Callable[[int], None] = lambda n: None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
            on_bytes(len(chunk))
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where verification results are remembered (``STREAMCHAT_CACHE_DIR`` overrides the appdirs default)."""
    override = os.environ.get("STREAMCHAT_CACHE_DIR")
    if override:
        return Path(override)
    import appdirs

    return Path(appdirs.user_cache_dir("streamchat", appauthor=False))


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
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"bundle not found: {path}")
        if not manifest_path.is_file():
            raise BundleError(f"{path} is not a StreamChat bundle (no {MANIFEST}); export one with `streamchat export`")
        try:
            raw = manifest_path.read_bytes()
            manifest = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise BundleError(f"{manifest_path} is corrupt ({exc}); re-copy or re-export the bundle") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{manifest_path} is not a StreamChat bundle manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{path} has bundle format version {manifest.get('format_version')}; this StreamChat reads "
                              f"version {FORMAT_VERSION}: re-export the bundle with this version")
        for key in ("model", "target", "quant", "tokenizer", "files", "max_context"):
            if key not in manifest:
                raise BundleError(f"{manifest_path} lacks {key!r}; re-export the bundle")
        bundle = cls(path, manifest)
        bundle.check_sizes()
        stamp = bundle._stamp(raw)
        marker = cache_dir() / "verified" / stamp
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

    def _file(self, entry: dict) -> Path:
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise BundleError(f"{self.path / MANIFEST} lists an unsafe path {entry['path']!r}")
        return self.path / rel

    def check_sizes(self) -> None:
        for entry in self.files:
            file = self._file(entry)
            if not file.is_file():
                raise BundleError(f"bundle file {entry['path']} is missing from {self.path}: re-copy or re-export the bundle")
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise BundleError(f"bundle file {entry['path']} is {size} bytes but the manifest says {entry['bytes']} "
                                  "(truncated or replaced): re-copy or re-export the bundle")

    def check_checksums(self, on_bytes: Callable[[int], None] = lambda n: None) -> None:
        for entry in self.files:
            if sha256_file(self._file(entry), on_bytes) != entry["sha256"]:
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
                runner = LiteStepServer(files, cache_dir() / "mindir" / f"{stamp}-{device}", device=device,
                                        device_id=int(os.environ.get("STREAMCHAT_LITE_DEVICE_ID", "0")), threads=threads)
            return StaticEngine(kind, self.config, int(graphs["capacity"]), list(graphs["prefill_gears"]), runner,
                                self.tokenizer().special.pad)
        raise BundleError(f"{self.path} targets {self.target} (runtime {runtime}); it cannot run on engine {kind}")
