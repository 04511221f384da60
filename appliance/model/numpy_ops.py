"""The model's operations on numpy arrays (fp32): the numpy reference and the INT4 prompt path build on ``NumpyOps``.

``ArrayOps`` is the stateless arithmetic (also what ``weights.dequantize`` runs on, as ``ARRAY``); ``NumpyOps`` adds
the model's weights and position ids. Attention, embedding and head are left to each backend, which owns its cache.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from appliance.model.definition import rotary_half_table, tanh_gelu
from appliance.model_config import ModelConfig


class ArrayOps:
    """Elementwise and shape operations; numbers stay Python scalars so an fp32 array stays fp32."""

    @staticmethod
    def to_float(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    @staticmethod
    def add(a, b):
        return a + b

    @staticmethod
    def sub(a, b):
        return a - b

    @staticmethod
    def mul(a, b):
        return a * b

    @staticmethod
    def div(a, b):
        return a / b

    floor = staticmethod(np.floor)
    tanh = staticmethod(np.tanh)

    @staticmethod
    def pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.stack([a, b], axis=-1)

    @staticmethod
    def reshape(x: np.ndarray, shape: list[int]) -> np.ndarray:
        return x.reshape([x.shape[i] if size == 0 else size for i, size in enumerate(shape)])

    @staticmethod
    def unsqueeze_last(x: np.ndarray) -> np.ndarray:
        return x[..., None]

    @staticmethod
    def slice_last(x: np.ndarray, length: int) -> np.ndarray:
        return x[..., :length]

    @staticmethod
    def split(x: np.ndarray, parts: int) -> list[np.ndarray]:
        return np.split(x, parts, axis=-1)

    @staticmethod
    def concat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs, axis=-1)

    def gelu(self, x: np.ndarray) -> np.ndarray:
        return tanh_gelu(self, x)


ARRAY = ArrayOps()


class NumpyOps(ArrayOps):
    """Linear layers, LayerNorm, heads and rotary tables over ``weights`` (name -> array, possibly memory maps) for
    ``positions`` [..., 2, length]."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray], positions: np.ndarray) -> None:
        self.config, self.weights, self.positions = config, weights, positions

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        return x @ self.weights[name + ".weight"].T + self.weights[name + ".bias"]

    def layer_norm(self, name: str, x: np.ndarray) -> np.ndarray:
        return layer_norm(x, self.weights[name + ".weight"], self.weights[name + ".bias"], self.config.layernorm_epsilon)

    def split_heads(self, x: np.ndarray, parts: int) -> list[np.ndarray]:
        cfg = self.config
        return np.split(x.reshape(*x.shape[:-1], cfg.num_heads, parts * cfg.head_dim), parts, axis=-1)

    def rotary_half(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = rotary_half_table(self.positions[..., row, :], self.config.rotary_dim)
        return cos[..., None, :], sin[..., None, :]


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis."""
    e = x - x.max(-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(-1, keepdims=True)
    return e
