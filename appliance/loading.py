"""Open a model bundle, or the built-in demo, as a warmed-up engine plus its tokenizer: what every front end runs.

The demo ships as a checkpoint and becomes a bundle through the normal export stage on first use. The runtime core
does not contain that stage: the front end that has it (the CLI, which passes it on to the window) hands it in as
``export``, so the app does not need ``model_export`` once the demo bundle exists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from appliance.bundle import Bundle
from appliance.engines import AUTO, Engine, warm_up
from appliance.errors import BundleError
from appliance.tokenizer import ChatGLMTokenizer

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo" / "checkpoint"
DEMO_QUANT = "int8"


@dataclass
class LoadedModel:
    engine: Engine
    tokenizer: ChatGLMTokenizer
    label: str
    summary: dict = field(default_factory=dict)  # target, quant, demo, path: what the status bar and settings show


class DemoExporter(Protocol):
    """The export stage, as the front end that owns it passes it in (``model_export.export.export_bundle`` fits)."""

    def __call__(self, checkpoint_dir: Path, out: Path, *, quant: str, force: bool, name: str,
                 extra_manifest: dict) -> object: ...


def demo_checkpoint_digest() -> str:
    """sha256 over the shipped demo checkpoint's files (about 3.7 MB): the demo bundle prepared from it records this,
    so a demo prepared by an earlier release (another model, another tokenizer) is prepared again after an upgrade."""
    digest = hashlib.sha256()
    for file in sorted(f for f in DEMO_CHECKPOINT.iterdir() if f.is_file()):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def demo_bundle(data: Path, export: DemoExporter | None, progress: Callable[[str], None] = lambda _: None) -> Path:
    """The built-in demo model as a bundle in the data folder, exported by ``export`` on first use, and again when the
    stored one no longer opens (an upgrade changed the bundle format) or was prepared from another release's demo
    checkpoint; ``progress`` hears of an export."""
    path = data / "bundles" / f"streamchat-demo-{DEMO_QUANT}"
    shipped = demo_checkpoint_digest()
    try:
        if Bundle.open(path).manifest.get("demo_checkpoint") == shipped:
            return path
        problem = "it was prepared from another release's demo model"
    except BundleError as exc:
        problem = str(exc)
    if export is None:
        raise BundleError(f"the built-in demo model is not prepared in {path} ({problem}): start the app with "
                          "`streamchat gui --demo` once, which prepares it")
    progress("preparing the built-in demo model (first run after installing or upgrading)...")
    export(DEMO_CHECKPOINT, path, quant=DEMO_QUANT, force=True, name="StreamChat demo model",
           extra_manifest={"demo": True, "demo_checkpoint": shipped})
    return path


def open_bundle(path: Path, threads: int | None = None, engine: str = AUTO, context: int | None = None,
                progress: Callable[[str], None] | None = None, device: str = "cpu", device_id: int = 0,
                weights: str | None = None) -> LoadedModel:
    """``threads`` None = the machine's physical cores; ``context`` caps the context window (and so the KV cache) of a
    cpu bundle; ``progress`` hears the stages of a long load; ``device``, ``device_id`` and ``weights`` go to the
    engine (``appliance.engines.EngineOptions``). The engine is warmed up, so the first message does not
    pay the runtime's first runs (on MindSpore Lite that is when the graphs are converted and built)."""
    opened = Bundle.open(path)
    summary = {"target": opened.target, "quant": opened.manifest["quant"]["weights"], "demo": opened.is_demo,
               "path": str(opened.path)}
    loaded = opened.engine(threads=threads, kind=engine, context=context, progress=progress, device=device,
                           device_id=device_id, weights=weights)
    tokenizer = opened.tokenizer()
    warm_up(loaded, tokenizer.special.bos, tokenizer.special.gmask)
    return LoadedModel(loaded, tokenizer, opened.label, summary)
