"""ChatGLM-6B (v1) written once, in the model card's order, against a small operations interface (``Ops``).

Every backend implements ``Ops`` with its own tensors and runs these functions: the numpy reference
(``model_export/reference.py``, arrays), the INT4 prompt path (``appliance/engines/int4_prefill.py``, arrays, linear
layers on the AVX2 kernel) and the ONNX builders (``model_export/graph.py``, ``model_export/ascend_graph.py``, value
names). What differs between them is behind ``Ops``: how weights are stored and multiplied, and above all attention,
which owns the KV cache (a growing numpy cache, an ``If`` between prompt and GroupQueryAttention, a fixed-capacity
cache under a validity mask, the engine's cache written by the prompt kernel). The order of the steps, the constants,
the per-head QKV split, the 2D rotary and the residual scaling are stated here only.

Where THUDM's v1 code is unusual (docs/chatglm6b.md): alpha fixed at sqrt(2 * 28) whatever the layer count, post-LN
residual on the *normalised* input, q|k|v split inside each head, 2D rotary (each half of a head turned by its own
position row) with fp16-rounded frequencies, masked scores filled with -10000 before the ``layer + 1`` rescale, tanh
GELU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from appliance.model.weights import (
    ATTENTION_DENSE,
    FINAL_NORM,
    INPUT_NORM,
    MLP_DOWN,
    MLP_UP,
    POST_ATTENTION_NORM,
    QUERY_KEY_VALUE,
    layer_prefix,
)
from appliance.model_config import ModelConfig

ALPHA = float(np.sqrt(2 * 28))  # GLMBlock's num_layers default (28) is never overridden by THUDM's model
MASK_FILL = -10000.0  # a masked attention score, before the (layer + 1) rescale
GELU_SCALE, GELU_CUBIC = 0.7978845608028654, 0.044715  # tanh GELU: sqrt(2/pi), and the cubic term's weight
ROTARY_BASE = 10000

Tensor = Any  # a numpy array, or the name of an ONNX value
Rope = tuple[Tensor, Tensor]  # cos and sign-folded sin, broadcastable over [..., length, heads, head_dim]


class Ops(Protocol):
    """What a backend provides. Linear and LayerNorm take the weight prefix (``transformer.layers.3.attention.dense``);
    arithmetic takes tensors or plain numbers; split/concat act on the last axis."""

    config: ModelConfig

    def embed(self, ids: Tensor) -> Tensor: ...  # word embedding rows [..., length, hidden]

    def rotary_half(self, row: int) -> tuple[Tensor, Tensor]: ...  # rotary_half_table at position row ``row``,
    # shaped [..., length, 1, rotary_dim] (a head axis to broadcast over)

    def linear(self, name: str, x: Tensor) -> Tensor: ...  # x @ W.T + b

    def layer_norm(self, name: str, x: Tensor) -> Tensor: ...

    def split_heads(self, x: Tensor, parts: int) -> list[Tensor]: ...  # [..., heads * parts * hd] viewed as
    # [..., heads, parts * hd] and split inside each head into ``parts`` tensors [..., heads, hd]

    def split(self, x: Tensor, parts: int) -> list[Tensor]: ...

    def concat(self, xs: list[Tensor]) -> Tensor: ...

    def add(self, a: Tensor, b: Tensor | float) -> Tensor: ...

    def mul(self, a: Tensor, b: Tensor | float | np.ndarray) -> Tensor: ...

    def tanh(self, x: Tensor) -> Tensor: ...

    def gelu(self, x: Tensor) -> Tensor: ...  # tanh_gelu(self, x), or a native op computing the same formula

    def attention(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...  # softmax attention of the
    # rotated q/k [..., length, heads, hd] under the prefix-LM mask, with THUDM's scaling (attention_scales),
    # keeping k/v in the backend's cache -> context [..., length, hidden]

    def output_rows(self, x: Tensor) -> Tensor: ...  # the positions whose logits are wanted (usually the last)

    def lm_head(self, x: Tensor) -> Tensor: ...  # logits


def rotary_inv_freq(rotary_dim: int) -> np.ndarray:
    """``1 / base^(2i/d)`` computed in fp32 and rounded through fp16, as THUDM's ``inv_freq`` buffer is."""
    exact = 1.0 / (ROTARY_BASE ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)))
    return exact.astype(np.float32).astype(np.float16).astype(np.float32)


def rotary_half_table(positions: np.ndarray, rotary_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of shape positions.shape + [rotary_dim] for one half of a head (the frequencies repeated twice, as
    THUDM's ``cos_cached`` / ``sin_cached`` are)."""
    freqs = positions.astype(np.float32)[..., None] * rotary_inv_freq(rotary_dim)
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def attention_scales(layer: int, head_dim: int) -> tuple[np.float32, np.float32]:
    """THUDM's attention scaling as (q's divisor, the scores' multiplier): q is divided by sqrt(head_dim) * (layer + 1)
    and the scores are multiplied back by (layer + 1) in fp32 before the softmax, so fp16 scores cannot overflow; a
    masked score becomes MASK_FILL * (layer + 1). Their net effect is ``net_attention_scale``."""
    coefficient = np.float32(layer + 1)
    return np.float32(np.sqrt(head_dim)) * coefficient, coefficient


def net_attention_scale(head_dim: int) -> float:
    """What ``attention_scales`` amounts to on unmasked scores, 1/sqrt(head_dim): an fp32 backend may apply it at once
    (masked weights are 0 after the softmax either way)."""
    return float(1 / np.sqrt(head_dim))


def forward(ops: Ops, ids: Tensor, observe: Callable[[Tensor], None] | None = None) -> Tensor:
    """Logits of ``ids`` at ``ops.output_rows``; ``observe`` sees the input of each layer, then the final LayerNorm's
    output (the reference records them at the last position)."""
    x = ops.embed(ids)
    rope = rotary_tables(ops)
    for layer in range(ops.config.num_layers):
        if observe:
            observe(x)
        x = block(ops, layer, x, rope)
    x = ops.layer_norm(FINAL_NORM, ops.output_rows(x))
    if observe:
        observe(x)
    return ops.lm_head(x)


def block(ops: Ops, layer: int, x: Tensor, rope: Rope) -> Tensor:
    """One GLMBlock. Its two halves around attention are row-local, so a backend may also run them a chunk of rows at
    a time with its own attention in between (the INT4 prompt path does)."""
    ln1, q, k, v = attention_inputs(ops, layer, x, rope)
    return attention_output(ops, layer, ln1, ops.attention(layer, q, k, v))


def attention_inputs(ops: Ops, layer: int, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Input LayerNorm, the fused QKV projection split inside each head (q | k | v), 2D rotary on q and k."""
    p = layer_prefix(layer)
    ln1 = ops.layer_norm(p + INPUT_NORM, x)
    q, k, v = ops.split_heads(ops.linear(p + QUERY_KEY_VALUE, ln1), 3)
    return ln1, rotary(ops, q, rope), rotary(ops, k, rope), v


def attention_output(ops: Ops, layer: int, ln1: Tensor, context: Tensor) -> Tensor:
    """Post-LN residuals on the normalised inputs times ALPHA: ``h = ln1*a + dense(ctx)``, ``out = ln2*a + mlp(ln2)``."""
    p = layer_prefix(layer)
    h = ops.add(ops.mul(ln1, ALPHA), ops.linear(p + ATTENTION_DENSE, context))
    ln2 = ops.layer_norm(p + POST_ATTENTION_NORM, h)
    return ops.add(ops.mul(ln2, ALPHA), ops.linear(p + MLP_DOWN, ops.gelu(ops.linear(p + MLP_UP, ln2))))


def rotary_tables(ops: Ops) -> Rope:
    """cos and sin over a whole head: its first half from position row 0 (the token's position), its second half from
    row 1 (the position inside the generated block). The sin carries rotate-half's sign, so ``rotary`` only swaps."""
    halves = [ops.rotary_half(row) for row in (0, 1)]
    quarter = np.ones(ops.config.rotary_dim // 2, np.float32)
    signs = np.concatenate([-quarter, quarter, -quarter, quarter])  # rotate_half(x) = cat(-x2, x1) within each half
    return ops.concat([cos for cos, _ in halves]), ops.mul(ops.concat([sin for _, sin in halves]), signs)


def rotary(ops: Ops, x: Tensor, rope: Rope) -> Tensor:
    """2D rotary of x [..., heads, head_dim]: rotate-half within each half, ``x*cos + swap(x)*sin``."""
    a, b, c, d = ops.split(x, 4)  # (a, b) the half turned by position row 0, (c, d) the half turned by row 1
    cos, sin = rope
    return ops.add(ops.mul(x, cos), ops.mul(ops.concat([b, a, d, c]), sin))


def tanh_gelu(ops: Ops, x: Tensor) -> Tensor:
    """``0.5*x*(1 + tanh(GELU_SCALE*x*(1 + GELU_CUBIC*x*x)))`` (MLP activation; it is not gated)."""
    inner = ops.mul(ops.mul(x, GELU_SCALE), ops.add(ops.mul(ops.mul(x, GELU_CUBIC), x), 1.0))
    return ops.mul(ops.mul(x, 0.5), ops.add(ops.tanh(inner), 1.0))
