"""ChatGLM-6B's elementwise pieces, shared by the numpy reference model and the INT4 prompt path.

Each follows THUDM's v1 modeling code where it is unusual (docs/chatglm6b.md): residual alpha fixed at sqrt(56), 2D
rotary with fp16-rounded ``inv_freq``, masked scores filled with -10000, tanh GELU.
"""

from __future__ import annotations

import numpy as np

ALPHA = float(np.sqrt(2 * 28))  # GLMBlock's num_layers default (28) is never overridden by the reference
MASK_FILL = -10000.0


def rotary_inv_freq(rotary_dim: int) -> np.ndarray:
    """``1/10000^(2i/d)`` computed in fp32 and rounded through fp16, as the reference's buffer is."""
    exact = 1.0 / (10000 ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)))
    return exact.astype(np.float32).astype(np.float16).astype(np.float32)


def rotary_tables(positions: np.ndarray, rotary_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of shape positions.shape + [rotary_dim] (frequencies repeated for the two halves)."""
    freqs = positions.astype(np.float32)[..., None] * rotary_inv_freq(rotary_dim)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half rotary over the last axis; x [b, L, heads, d], cos/sin [b, L, d]."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def softmax(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Over the last axis; ``in_place`` overwrites ``x`` (a long prompt's scores are a layer's largest temporaries)."""
    e = np.subtract(x, x.max(-1, keepdims=True), out=x if in_place else None)
    np.exp(e, out=e)
    e /= e.sum(-1, keepdims=True)
    return e
