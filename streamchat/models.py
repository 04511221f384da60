"""What the CLI opens: a bundle or the built-in demo (through ``appliance.loading``), or a checkpoint on the numpy
reference (``--checkpoint``, which needs the export package and so exists only here)."""

from __future__ import annotations

import sys
from pathlib import Path

from appliance.engines import AUTO
from appliance.errors import StreamChatError
from appliance.loading import LoadedModel, demo_bundle, open_bundle


def export_demo(checkpoint_dir: Path, out: Path, **options) -> None:
    """The export stage for the demo's first run, imported only when the demo bundle has to be (re)built."""
    from model_export.export import export_bundle

    export_bundle(checkpoint_dir, out, **options)


def load_model(checkpoint: Path | None = None, bundle: Path | None = None, threads: int | None = None,
               demo: bool = False, data: Path | None = None, engine: str = AUTO, quiet: bool = False,
               context: int | None = None, device: str = "cpu", device_id: int = 0,
               weights: str | None = None) -> LoadedModel:
    """``threads`` None = the machine's physical cores (bundles only; the reference uses numpy's BLAS threads);
    ``context`` caps the context window (and so the KV cache) of a cpu bundle; ``device``, ``device_id`` and
    ``weights`` say where a bundle's engine runs and the weight format it holds (``EngineOptions``)."""
    def say(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    if demo:
        from appliance.folders import data_dir
        from appliance.settings import load_settings

        bundle = demo_bundle(data or data_dir(load_settings()), export_demo, say)
    if checkpoint is not None:
        if device != "cpu" or weights:
            raise StreamChatError("--checkpoint runs on the numpy reference, on the CPU and in fp32: give --bundle "
                                  "for --device or --weights")
        from appliance.tokenizer import ChatGLMTokenizer
        from model_export.checkpoint import Checkpoint
        from model_export.reference import ReferenceEngine, ReferenceModel

        ckpt = Checkpoint(checkpoint)
        engine = ReferenceEngine(ReferenceModel.from_checkpoint(ckpt))
        return LoadedModel(engine, ChatGLMTokenizer.from_dir(checkpoint), f"{checkpoint.name} (numpy reference)",
                           {"target": "numpy", "quant": "fp32", "demo": False, "path": str(checkpoint)})
    if bundle is not None:
        return open_bundle(bundle, threads=threads, engine=engine, context=context, progress=say, device=device,
                           device_id=device_id, weights=weights)
    raise StreamChatError("give --checkpoint DIR or --bundle DIR")
