"""The contract between the generator and a runtime: an engine owns tensors and the KV cache, nothing else.

The generator computes positions, masks and sampling, so the numpy reference, onnxruntime and MindSpore Lite are
compared on exactly the same calls.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


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
