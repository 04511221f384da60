"""ChatGLM-6B's weight names and the MatMulNBits storage format, stated once.

Names follow THUDM's state dict: ``transformer.layers.N.<part>.{weight,bias}``, Linear weights ``[out, in]``.

Quantized matrices use onnxruntime's MatMulNBits layout (the cpu graph multiplies them natively, the AVX2 prompt
kernel reads the same bytes, the Ascend graphs dequantize them in the graph): a weight ``W [N, K]`` is cut along K
into groups; ``packed [N, blocks, group * bits / 8]`` uint8 codes, ``scales [N, blocks]``, ``w ~ (code - zero_point)
* scale`` with the implicit zero point ``2^(bits-1)``; INT4 holds two codes a byte, the low nibble first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from appliance.model_config import ModelConfig

EMBEDDING = "transformer.word_embeddings.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "transformer.final_layernorm"
INPUT_NORM = "input_layernorm"
QUERY_KEY_VALUE = "attention.query_key_value"
ATTENTION_DENSE = "attention.dense"
POST_ATTENTION_NORM = "post_attention_layernorm"
MLP_UP = "mlp.dense_h_to_4h"
MLP_DOWN = "mlp.dense_4h_to_h"
LINEARS = (QUERY_KEY_VALUE, ATTENTION_DENSE, MLP_UP, MLP_DOWN)
WEIGHT_PRECISIONS = ("int4", "int8", "fp16", "fp32")  # how a bundle can store the linear layers, fewest bits first


def layer_prefix(layer: int) -> str:
    return f"transformer.layers.{layer}."


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model uses, with its [out, in] shape."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {EMBEDDING: (cfg.vocab_size, h), FINAL_NORM + ".weight": (h,),
                                          FINAL_NORM + ".bias": (h,), LM_HEAD: (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = layer_prefix(n)
        for ln in (INPUT_NORM, POST_ATTENTION_NORM):
            shapes[p + ln + ".weight"] = shapes[p + ln + ".bias"] = (h,)
        for name, (out, inp) in cfg.linear_shapes().items():
            shapes[p + name + ".weight"] = (out, inp)
            shapes[p + name + ".bias"] = (out,)
    return shapes


def zero_point(bits: int) -> int:
    """The code that stands for 0 (8 for INT4, 128 for INT8)."""
    return 2 ** (bits - 1)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """INT4 codes (0..15) along the last axis, two a byte, the low nibble first."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The INT4 codes ``pack_nibbles`` packed: twice as many along the last axis, the low nibble first."""
    codes = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    codes[..., 0::2], codes[..., 1::2] = packed & 15, packed >> 4
    return codes


class DequantOps(Protocol):
    """The elementwise and shape operations ``dequantize`` needs (numpy arrays, or ONNX value names). ``reshape``
    follows ONNX: 0 keeps that axis."""

    def to_float(self, x: Any) -> Any: ...

    def add(self, a: Any, b: Any) -> Any: ...

    def sub(self, a: Any, b: Any) -> Any: ...

    def mul(self, a: Any, b: Any) -> Any: ...

    def div(self, a: Any, b: Any) -> Any: ...

    def floor(self, x: Any) -> Any: ...

    def pair(self, a: Any, b: Any) -> Any: ...  # stacked on a new last axis

    def reshape(self, x: Any, shape: list[int]) -> Any: ...

    def unsqueeze_last(self, x: Any) -> Any: ...

    def slice_last(self, x: Any, length: int) -> Any: ...


def dequantize(ops: DequantOps, packed: Any, scales: Any, bits: int, k: int, row_axes: int) -> Any:
    """Values ``[*rows, k]`` of a MatMulNBits matrix, or of some of its rows, from ``packed [*rows, blocks, blob]``
    (uint8) and float ``scales [*rows, blocks]``; ``row_axes`` is len(rows). The code arithmetic runs in floats (exact
    for bytes), which every target's op set has."""
    keep = [0] * row_axes
    codes = ops.to_float(packed)
    if bits == 4:
        high = ops.floor(ops.div(codes, 16.0))
        codes = ops.reshape(ops.pair(ops.sub(codes, ops.mul(high, 16.0)), high), keep + [0, -1])  # low nibble first
    values = ops.mul(ops.sub(codes, float(zero_point(bits))), ops.unsqueeze_last(scales))  # [*rows, blocks, group]
    return ops.slice_last(ops.reshape(values, keep + [-1]), k)  # the last group may be zero padding
