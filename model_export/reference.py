"""A plain numpy (fp32) ChatGLM-6B: the oracle that exports are verified against, and the first engine.

Follows THUDM's v1 modeling code exactly where it is unusual (see docs/chatglm6b.md): residual alpha fixed at sqrt(56),
post-LN residual on the *normalised* input, per-head interleaved QKV, 2D rotary with fp16-rounded ``inv_freq``,
masked scores filled with -10000 before the ``layer_id + 1`` rescale, tanh GELU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from appliance.chatglm_ops import ALPHA, MASK_FILL, apply_rotary, gelu, layer_norm, rotary_tables, softmax
from appliance.engines import Engine
from appliance.errors import EngineError
from appliance.model_config import ModelConfig

REFERENCE_MAX_PARAMS = 2_000_000_000  # the reference holds fp32 copies of every weight

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

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.tables["transformer.word_embeddings.weight"][ids], dtype=np.float32)

    def _head(self, x: np.ndarray) -> np.ndarray:
        """x @ lm_head.T a block of vocabulary rows at a time (the head may be a 130528-row memory map)."""
        head = self.tables["lm_head.weight"]
        step = 4096
        return np.concatenate([x @ np.asarray(head[r:r + step], dtype=np.float32).T for r in range(0, head.shape[0], step)],
                              axis=-1)

    def _attention(self, n: int, x: np.ndarray, pos: np.ndarray, mask: np.ndarray | None,
                   past: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        cfg, w, p = self.config, self.w, f"transformer.layers.{n}.attention."
        b, length, _ = x.shape
        qkv = (x @ w[p + "query_key_value.weight"].T + w[p + "query_key_value.bias"]).reshape(
            b, length, cfg.num_heads, 3 * cfg.head_dim)
        q, k, v = np.split(qkv, 3, axis=-1)
        rd = cfg.rotary_dim
        cos0, sin0 = rotary_tables(pos[:, 0], rd)
        cos1, sin1 = rotary_tables(pos[:, 1], rd)
        q = np.concatenate([apply_rotary(q[..., :rd], cos0, sin0), apply_rotary(q[..., rd:], cos1, sin1)], axis=-1)
        k = np.concatenate([apply_rotary(k[..., :rd], cos0, sin0), apply_rotary(k[..., rd:], cos1, sin1)], axis=-1)
        k_seq, v_seq = k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3)  # cache layout [seq, b, heads, hd]
        if past is not None:
            k_seq, v_seq = np.concatenate([past[0], k_seq]), np.concatenate([past[1], v_seq])
        coeff = np.float32(n + 1)
        qh = q.transpose(0, 2, 1, 3) / (np.float32(np.sqrt(cfg.head_dim)) * coeff)  # [b, heads, L, hd]
        scores = qh @ k_seq.transpose(1, 2, 3, 0)  # [b, heads, L, S]
        if mask is not None and mask.any():
            scores = np.where(mask, np.float32(MASK_FILL), scores)
        probs = softmax(scores * coeff)
        context = (probs @ v_seq.transpose(1, 2, 0, 3)).transpose(0, 2, 1, 3).reshape(b, length, cfg.hidden_size)
        return context @ w[p + "dense.weight"].T + w[p + "dense.bias"], (k_seq, v_seq)

    def forward(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray | None = None,
                past: KVCache | None = None, all_logits: bool = False) -> ForwardOutput:
        """ids [b, L]; position_ids [b, 2, L]; mask [b, 1, L, S] bool (True = masked) or None (attend all)."""
        cfg, w = self.config, self.w
        x = self._embed(np.asarray(ids))
        hidden, presents = [], []
        for n in range(cfg.num_layers):
            hidden.append(x[:, -1].copy())
            p = f"transformer.layers.{n}."
            ln1 = layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], cfg.layernorm_epsilon)
            attn, kv = self._attention(n, ln1, position_ids, mask, past[n] if past else None)
            presents.append(kv)
            h = ln1 * ALPHA + attn
            ln2 = layer_norm(h, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"],
                             cfg.layernorm_epsilon)
            mlp = gelu(ln2 @ w[p + "mlp.dense_h_to_4h.weight"].T + w[p + "mlp.dense_h_to_4h.bias"])
            x = ln2 * ALPHA + (mlp @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"])
        x = layer_norm(x, w["transformer.final_layernorm.weight"], w["transformer.final_layernorm.bias"],
                       cfg.layernorm_epsilon)
        hidden.append(x[:, -1].copy())
        logits = self._head(x if all_logits else x[:, -1])
        return ForwardOutput(logits=logits, past=presents, hidden_states=hidden)


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
