"""The files of an Ascend bundle's smoke test (``smoke_test.py``: ``appliance.ascend_smoke``).

The model truncated to its first layer (embedding, layer 0, final LayerNorm, lm_head) as a prefill graph of the
smallest gear: on a board it converts and builds in minutes where the whole model takes hours, and it still holds every
kind of op the device graphs hold, attention over the capacity-sized cache included. It names the bundle's weights,
which the shared weight file already holds, so it adds no weight bytes. Beside it, a fixed prompt's inputs, made by the
engine's own ``prefill_inputs``, and the logits the numpy reference computes for them with the same layer (the
reference run with a one-layer config: ``forward`` stops after ``config.num_layers`` layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from appliance.conversion import SMOKE_EXPECTED, SMOKE_INPUTS, smoke_graph_files
from appliance.engines.static import prefill_inputs
from appliance.model_config import ModelConfig
from appliance.positions import layout_of
from appliance.tokenizer import ChatGLMTokenizer
from model_export.ascend_graph import AscendDecoderGraph
from model_export.export import ExportError
from model_export.reference import ReferenceModel
from model_export.verify import VERIFY_PROMPTS

SMOKE_PROMPT = VERIFY_PROMPTS[0]  # short: it fits the smallest gear of every target


def write_smoke_test(ckpt, tmp: Path, gears: list[int], variants: dict[str, str],
                     make_graph: Callable[[ModelConfig, str], AscendDecoderGraph], doc: str) -> None:
    """``smoke.onnx`` (and ``smoke.fp32.onnx``: ``variants`` maps a file suffix to its compute precision, as for the
    bundle's other graphs), built by ``make_graph`` from a one-layer config, and the smoke test's inputs and logits."""
    one_layer = dataclasses.replace(ckpt.config, num_layers=1)
    for suffix, precision in variants.items():
        for file in smoke_graph_files(gears, suffix).values():
            onnx.save_model(make_graph(one_layer, precision).build_static(gears[0], doc=doc), str(tmp / file))
    inputs, logits = smoke_data(ckpt, one_layer, gears[0])
    (tmp / SMOKE_INPUTS).parent.mkdir(exist_ok=True)
    with (tmp / SMOKE_INPUTS).open("wb") as fh:
        np.savez(fh, **inputs)
    np.save(tmp / SMOKE_EXPECTED, logits)


def smoke_data(ckpt, one_layer: ModelConfig, gear: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The prefill inputs of SMOKE_PROMPT padded to ``gear``, and the reference's fp32 logits for it [1, vocab]."""
    tokenizer = ChatGLMTokenizer.from_dir(ckpt.dir)
    special = tokenizer.special
    ids = tokenizer.encode_prompt(SMOKE_PROMPT)
    if len(ids) > gear:
        raise ExportError(f"the smoke test's prompt has {len(ids)} tokens, more than the smallest prefill gear {gear}")
    layout = layout_of(ids, special.bos, special.gmask, special.mask)
    positions, mask = layout.position_ids(), layout.mask()
    inputs = prefill_inputs(np.array(ids), positions, mask, gear, special.pad)
    full = ReferenceModel.from_checkpoint(ckpt, lazy=True)  # fp32 copies made per use, as for a 6B checkpoint
    reference = ReferenceModel(one_layer, full.w, full.tables)
    logits = reference.forward(np.array([ids]), positions[None], mask[None, None]).logits
    return inputs, np.asarray(logits, dtype=np.float32)
