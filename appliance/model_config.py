"""The ChatGLM-6B (v1) hyper-parameters a runtime needs, read from THUDM's config.json and validated."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from appliance.errors import CheckpointError
from appliance.model.weights import ATTENTION_DENSE, MLP_DOWN, MLP_UP, QUERY_KEY_VALUE

# Generous bounds around ChatGLM-6B's own values (in the comments), checked before anything is sized from them: a
# hostile config.json or manifest cannot ask for terabytes, a zero-sized head or a billion layers.
LIMITS = {"vocab_size": (1, 1 << 20),  # 130528
          "hidden_size": (4, 32768),  # 4096
          "num_layers": (1, 256),  # 28
          "num_heads": (1, 256),  # 32
          "inner_hidden_size": (1, 131072),  # 16384
          "max_sequence_length": (1, 32768)}  # 2048
EPSILON_RANGE = (1e-12, 0.1)  # 1e-5

# The element types a KV cache is kept in, by the name a manifest gives (a cpu bundle's ``graphs.kv_cache``; bundles
# exported before the field existed hold fp32 caches: UNMARKED_KV_CACHE).
KV_CACHE_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}
UNMARKED_KV_CACHE = "fp32"
TOKEN_IDS = ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id")


def _setting(raw: dict[str, Any], key: str, source: str, default: Any = None) -> Any:
    if key in raw:
        return raw[key]
    if default is None:
        raise CheckpointError(f"{source}: missing key {key!r} (is this a ChatGLM-6B config.json?)")
    return default


def _integer(raw: dict[str, Any], key: str, low: int, high: int, source: str, default: int | None = None) -> int:
    """An integer setting (an integral float such as 4096.0 is accepted; bools, strings, NaN and inf are not)."""
    value = _setting(raw, key, source, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise CheckpointError(f"{source}: {key} is {value!r}; allowed: an integer in {low}..{high}")
    return value


def _number(raw: dict[str, Any], key: str, low: float, high: float, source: str, default: float) -> float:
    value = _setting(raw, key, source, default)
    if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high):
        raise CheckpointError(f"{source}: {key} is {value!r}; allowed: a number in {low:g}..{high:g}")
    return float(value)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    inner_hidden_size: int
    max_sequence_length: int
    layernorm_epsilon: float
    bos_token_id: int
    eos_token_id: int
    mask_token_id: int
    gmask_token_id: int
    pad_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Each half of a head is rotated by its own position row (2D rotary)."""
        return self.head_dim // 2

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of the four linear layers of a block, as stored in the checkpoint."""
        h, f = self.hidden_size, self.inner_hidden_size
        return {QUERY_KEY_VALUE: (3 * h, h), ATTENTION_DENSE: (h, h), MLP_UP: (f, h), MLP_DOWN: (h, f)}

    def param_count(self) -> int:
        per_layer = sum(o * i + o for o, i in self.linear_shapes().values()) + 4 * self.hidden_size
        return 2 * self.vocab_size * self.hidden_size + self.num_layers * per_layer + 2 * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Accept THUDM's config.json (or our own ``to_dict``); refuse other architectures by name, and values out of
        ``LIMITS`` with the allowed range."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object of model settings, found {type(raw).__name__}")
        if raw.get("model_type", "chatglm") != "chatglm":
            raise CheckpointError(f"{source}: model_type {raw.get('model_type')!r} is not ChatGLM-6B ('chatglm')")
        if "multi_query_attention" in raw or "ffn_hidden_size" in raw or "padded_vocab_size" in raw:
            raise CheckpointError(f"{source}: this is a ChatGLM2/3-6B config; StreamChat supports ChatGLM-6B (v1) only")
        if raw.get("quantization_bit", 0) not in (0, None):
            raise CheckpointError(f"{source}: a pre-quantized checkpoint (quantization_bit={raw['quantization_bit']}); "
                                  "export from the original fp16 checkpoint instead")
        if raw.get("position_encoding_2d", True) is not True:
            raise CheckpointError(f"{source}: position_encoding_2d must be true for ChatGLM-6B")
        heads_key = "num_heads" if "num_heads" in raw else "num_attention_heads"
        hidden = _integer(raw, "hidden_size", *LIMITS["hidden_size"], source)
        vocab = _integer(raw, "vocab_size", *LIMITS["vocab_size"], source)
        cfg = cls(
            vocab_size=vocab, hidden_size=hidden,
            num_layers=_integer(raw, "num_layers", *LIMITS["num_layers"], source),
            num_heads=_integer(raw, heads_key, *LIMITS["num_heads"], source),
            inner_hidden_size=_integer(raw, "inner_hidden_size", *LIMITS["inner_hidden_size"], source, 4 * hidden),
            max_sequence_length=_integer(raw, "max_sequence_length", *LIMITS["max_sequence_length"], source, 2048),
            layernorm_epsilon=_number(raw, "layernorm_epsilon", *EPSILON_RANGE, source, 1e-5),
            **{key: _integer(raw, key, 0, vocab - 1, source) for key in TOKEN_IDS},
        )
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
            raise CheckpointError(f"{source}: hidden_size {cfg.hidden_size} does not split into {cfg.num_heads} heads "
                                  "whose size is a multiple of 4 (2D rotary)")
        return cfg
