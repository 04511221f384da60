"""The contract between the generator and a runtime: an engine owns tensors and the KV cache, nothing else.

The generator computes positions, masks and sampling, so the numpy reference, onnxruntime and MindSpore Lite are
compared on exactly the same calls.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from appliance.positions import layout_of


class Sequence(Protocol):
    """One conversation's KV cache on an engine."""

    def prefill(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """ids [L] int, position_ids [2, L] int, mask [L, L] bool (True = masked) -> logits [vocab] of the last position."""
        ...

    def step(self, token_id: int, position_ids: np.ndarray) -> np.ndarray:
        """Append one token at position_ids [2] -> logits [vocab] of the new token."""
        ...


class Engine(Protocol):
    """A loaded model that can start sequences; ``max_context`` bounds prompt + answer."""

    name: str
    max_context: int

    def start(self) -> Sequence:
        """A sequence with an empty cache. Callers use one sequence at a time: an engine may reuse one cache and
        retire the previous sequence (the onnxruntime engine does)."""
        ...


def warm_up(engine: Engine, bos_id: int, gmask_id: int) -> None:
    """Run ``[gMASK] <sop>`` and one step right after loading, so the first message does not pay the runtime's first
    runs: onnxruntime initializes its kernels and first touches the KV cache then (measured at 8 layers, a first
    16-token prompt took 1.9 s cold and 0.55 s after this warm-up, which itself took 1.3-1.6 s)."""
    ids = [gmask_id, bos_id]
    layout = layout_of(ids, bos_id, gmask_id, gmask_id)
    sequence = engine.start()
    sequence.prefill(np.array(ids), layout.position_ids(), layout.mask())
    sequence.step(bos_id, layout.step_position(len(ids) + 1))
