"""A plain numpy (fp32) ChatGLM-6B: the oracle that exports are verified against, and the first engine.

The model is ``appliance.model.definition`` on numpy arrays; this module adds what only the reference does: weights
held in fp32 (or converted per use), a KV cache grown by concatenation, and attention computed exactly as THUDM's code
does (``attention_scales``: q divided first, masked scores filled, the scores rescaled before the softmax).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from appliance.engines import Engine
from appliance.errors import EngineError
from appliance.model.definition import MASK_FILL, attention_scales, forward
from appliance.model.numpy_ops import NumpyOps, softmax
from appliance.model.weights import EMBEDDING, LM_HEAD
from appliance.model_config import ModelConfig

REFERENCE_MAX_PARAMS = 2_000_000_000  # the reference holds fp32 copies of every weight
HEAD_ROWS = 4096  # vocabulary rows of the head multiplied at a time (the head may be a 130528-row memory map)

KVCache = list[tuple[np.ndarray, np.ndarray]]  # per layer (key, value), each [seq, batch, heads, head_dim]


@dataclass
class ForwardOutput:
    logits: np.ndarray  # [b, L, vocab] or [b, vocab] (last position only)
    past: KVCache
    hidden_states: list[np.ndarray] = field(default_factory=list)  # last position: input of each layer, then final LN


class _LazyWeights(Mapping):
    """fp32 views of checkpoint tensors made on each use, so a full-width model is never held in fp32."""

    def __init__(self, checkpoint) -> None:
        self.checkpoint = checkpoint

    def __getitem__(self, name: str) -> np.ndarray:
        return self.checkpoint.tensor(name)

    def __iter__(self):
        return iter(self.checkpoint.names())

    def __len__(self) -> int:
        return sum(1 for _ in self.checkpoint.names())


class _ReferenceOps(NumpyOps):
    """One forward call: batch-first activations [b, L, hidden], the cache ``past`` extended into ``presents``."""

    def __init__(self, model: ReferenceModel, positions: np.ndarray, mask: np.ndarray | None, past: KVCache | None,
                 all_logits: bool) -> None:
        super().__init__(model.config, model.w, positions)
        self.tables, self.mask, self.past, self.all_logits = model.tables, mask, past, all_logits
        self.presents: KVCache = []

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.tables[EMBEDDING][ids], dtype=np.float32)

    def attention(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        b, length, _, head_dim = q.shape
        k_seq, v_seq = k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3)  # cache layout [seq, b, heads, hd]
        if self.past is not None:
            k_seq, v_seq = np.concatenate([self.past[layer][0], k_seq]), np.concatenate([self.past[layer][1], v_seq])
        self.presents.append((k_seq, v_seq))
        divisor, coeff = attention_scales(layer, head_dim)
        qh = q.transpose(0, 2, 1, 3) / divisor  # [b, heads, L, hd]
        scores = qh @ k_seq.transpose(1, 2, 3, 0)  # [b, heads, L, S]
        if self.mask is not None and self.mask.any():
            scores = np.where(self.mask, np.float32(MASK_FILL), scores)
        probs = softmax(scores * coeff)
        return (probs @ v_seq.transpose(1, 2, 0, 3)).transpose(0, 2, 1, 3).reshape(b, length, -1)

    def output_rows(self, x: np.ndarray) -> np.ndarray:
        return x if self.all_logits else x[:, -1]

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        """x @ lm_head.T a block of vocabulary rows at a time."""
        head = self.tables[LM_HEAD]
        return np.concatenate([x @ np.asarray(head[r:r + HEAD_ROWS], dtype=np.float32).T
                               for r in range(0, head.shape[0], HEAD_ROWS)], axis=-1)


class ReferenceModel:
    """The model over fp32 weights: held in memory (small checkpoints) or converted per use (``lazy``)."""

    def __init__(self, config: ModelConfig, tensors: Mapping[str, np.ndarray], tables: Mapping | None = None) -> None:
        self.config = config
        self.w = tensors
        self.tables = tables if tables is not None else tensors  # embedding / lm_head, possibly memory maps

    @classmethod
    def from_checkpoint(cls, checkpoint, lazy: bool = False) -> ReferenceModel:
        if lazy:
            return cls(checkpoint.config, _LazyWeights(checkpoint), checkpoint.stored_tensors())
        if checkpoint.config.param_count() > REFERENCE_MAX_PARAMS:
            raise EngineError(f"{checkpoint.dir} holds {checkpoint.config.param_count() / 1e9:.1f} B parameters: too "
                              "large for the numpy reference; export a bundle first (streamchat export ... --out BUNDLE) "
                              "and run it with --bundle BUNDLE")
        return cls(checkpoint.config, {name: np.ascontiguousarray(checkpoint.tensor(name)) for name in checkpoint.names()})

    def forward(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray | None = None,
                past: KVCache | None = None, all_logits: bool = False) -> ForwardOutput:
        """ids [b, L]; position_ids [b, 2, L]; mask [b, 1, L, S] bool (True = masked) or None (attend all)."""
        ops = _ReferenceOps(self, np.asarray(position_ids), mask, past, all_logits)
        hidden: list[np.ndarray] = []

        def observe(x: np.ndarray) -> None:
            hidden.append((x if x.ndim == 2 else x[:, -1]).copy())

        logits = forward(ops, np.asarray(ids), observe)
        return ForwardOutput(logits=logits, past=ops.presents, hidden_states=hidden)


class ReferenceSequence:
    """One conversation's KV cache over the reference model (batch 1)."""

    def __init__(self, model: ReferenceModel) -> None:
        self.model = model
        self.past: KVCache | None = None

    def prefill(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = self.model.forward(np.asarray(ids)[None], position_ids[None], mask[None, None])
        self.past = out.past
        return out.logits[0]

    def step(self, token_id: int, position_ids: np.ndarray) -> np.ndarray:
        out = self.model.forward(np.array([[token_id]]), position_ids.reshape(1, 2, 1), None, self.past)
        self.past = out.past
        return out.logits[0]


class ReferenceEngine(Engine):
    """The numpy reference behind the ``Engine`` protocol."""

    name = "numpy-reference"

    def __init__(self, model: ReferenceModel) -> None:
        self.model = model
        self.max_context = model.config.max_sequence_length

    def start(self) -> ReferenceSequence:
        return ReferenceSequence(self.model)
