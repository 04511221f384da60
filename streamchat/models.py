"""Open what the user pointed at (a checkpoint or a bundle) as an engine plus its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.engines import Engine
from appliance.errors import StreamChatError
from appliance.tokenizer import ChatGLMTokenizer


@dataclass
class LoadedModel:
    engine: Engine
    tokenizer: ChatGLMTokenizer
    label: str


def load_model(checkpoint: Path | None = None, bundle: Path | None = None, threads: int | None = None) -> LoadedModel:
    """``threads`` None = the machine's physical cores (bundles only; the reference uses numpy's BLAS threads)."""
    if checkpoint is not None:
        from model_export.checkpoint import Checkpoint
        from model_export.reference import ReferenceEngine, ReferenceModel

        ckpt = Checkpoint(checkpoint)
        engine = ReferenceEngine(ReferenceModel.from_checkpoint(ckpt))
        return LoadedModel(engine, ChatGLMTokenizer.from_dir(checkpoint), f"{checkpoint.name} (numpy reference)")
    if bundle is not None:
        from appliance.bundle import Bundle

        opened = Bundle.open(bundle)
        return LoadedModel(opened.engine(threads=threads), opened.tokenizer(), opened.label)
    raise StreamChatError("give --checkpoint DIR or --bundle DIR")
