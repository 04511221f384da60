"""ChatGLM-6B's 2D position ids and prefix-LM mask (``get_position_ids`` / ``get_masks`` of the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PromptLayout:
    """Where ``<sop>`` (context end) and ``[gMASK]`` sit in a prompt; decode positions follow from them."""

    length: int
    context_length: int  # index of <sop>
    mask_position: int  # index of [gMASK] (or [MASK])

    def position_ids(self) -> np.ndarray:
        """[2, L] int64: row 0 counts up to ``<sop>`` then stays at ``[gMASK]``; row 1 is 0 before ``<sop>`` then 1, 2, ..."""
        pos = np.arange(self.length, dtype=np.int64)
        pos[self.context_length:] = self.mask_position
        block = np.zeros(self.length, dtype=np.int64)
        block[self.context_length:] = np.arange(1, self.length - self.context_length + 1)
        return np.stack([pos, block])

    def mask(self) -> np.ndarray:
        """[L, L] bool, True = masked: causal, except every column before ``<sop>`` is visible (bidirectional prefix)."""
        visible = np.tril(np.ones((self.length, self.length), dtype=bool))
        visible[:, : self.context_length] = True
        return ~visible

    def step_position(self, total_length: int) -> np.ndarray:
        """[2] int64 for the token that makes the sequence ``total_length`` long."""
        return np.array([self.mask_position, total_length - self.context_length], dtype=np.int64)


def layout_of(ids: list[int], bos_id: int, gmask_id: int, mask_id: int) -> PromptLayout:
    """Layout of a prompt that ends with ``[gMASK] <sop>`` as the tokenizer builds it."""
    if bos_id not in ids:
        raise ValueError("prompt has no <sop>: build it with ChatGLMTokenizer.encode_prompt")
    ctx = ids.index(bos_id)
    mark = gmask_id if gmask_id in ids else mask_id
    return PromptLayout(length=len(ids), context_length=ctx, mask_position=ids.index(mark))
