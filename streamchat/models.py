"""Open what the user pointed at (a checkpoint or a bundle) as an engine plus its tokenizer."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.engines import Engine, warm_up
from appliance.errors import StreamChatError
from appliance.tokenizer import ChatGLMTokenizer


@dataclass
class LoadedModel:
    engine: Engine
    tokenizer: ChatGLMTokenizer
    label: str
    summary: dict = field(default_factory=dict)  # target, quant, demo, path: what the status bar and settings show


DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "appliance" / "demo" / "checkpoint"
DEMO_QUANT = "int8"


def demo_bundle(data: Path, quiet: bool = False) -> Path:
    """The built-in demo model as a bundle in the data folder, exported through the normal export stage on first use
    (and again if the stored one no longer opens, e.g. after an upgrade changed the bundle format)."""
    from appliance.bundle import Bundle
    from appliance.errors import BundleError

    path = data / "bundles" / f"streamchat-demo-{DEMO_QUANT}"
    try:
        Bundle.open(path)
        return path
    except BundleError:
        pass
    from model_export.export import export_bundle
    from model_export.progress import Progress

    if not quiet:
        print("preparing the built-in demo model (first run only)...", file=sys.stderr, flush=True)
    export_bundle(DEMO_CHECKPOINT, path, quant=DEMO_QUANT, force=True, progress=Progress(enabled=False),
                  name="StreamChat demo model", extra_manifest={"demo": True})
    return path


def load_model(checkpoint: Path | None = None, bundle: Path | None = None, threads: int | None = None,
               demo: bool = False, data: Path | None = None, engine: str = "auto", quiet: bool = False,
               context: int | None = None) -> LoadedModel:
    """``threads`` None = the machine's physical cores (bundles only; the reference uses numpy's BLAS threads);
    ``context`` caps the context window (and so the KV cache) of a cpu bundle."""
    if demo:
        from appliance.folders import data_dir
        from appliance.settings import load_settings

        bundle = demo_bundle(data or data_dir(load_settings()), quiet=quiet)
    if checkpoint is not None:
        from model_export.checkpoint import Checkpoint
        from model_export.reference import ReferenceEngine, ReferenceModel

        ckpt = Checkpoint(checkpoint)
        engine = ReferenceEngine(ReferenceModel.from_checkpoint(ckpt))
        return LoadedModel(engine, ChatGLMTokenizer.from_dir(checkpoint), f"{checkpoint.name} (numpy reference)",
                           {"target": "numpy", "quant": "fp32", "demo": False, "path": str(checkpoint)})
    if bundle is not None:
        from appliance.bundle import Bundle

        opened = Bundle.open(bundle)
        summary = {"target": opened.target, "quant": opened.manifest["quant"]["weights"], "demo": opened.is_demo,
                   "path": str(opened.path)}
        loaded, tokenizer = opened.engine(threads=threads, kind=engine, context=context), opened.tokenizer()
        warm_up(loaded, tokenizer.special.bos, tokenizer.special.gmask)
        return LoadedModel(loaded, tokenizer, opened.label, summary)
    raise StreamChatError("give --checkpoint DIR or --bundle DIR")
