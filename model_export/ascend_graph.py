"""Graphs for the Ascend targets: static shapes, standard ONNX ops only, a fixed-capacity KV cache.

MindSpore Lite compiles fixed shapes and rejects contrib ops and INT4 tensors, so (facts measured with Lite 2.0.0):
- one prefill graph per sequence gear (the prompt is right-padded to the gear) and a one-token decode graph, all
  reading one weight file;
- the KV cache has a fixed capacity ``C`` (``[batch, heads, C, head_dim]``): prefill returns the prompt's rows with
  zero rows concatenated after them (a Pad of that axis comes out of Lite's converter on the wrong axis), decode
  writes the new token's K/V into the slot selected by a one-hot ``write_slot`` input and attends over the whole
  capacity under ``attention_bias``, added to the scores (past length 0 and bool ``Where`` masks fail in Lite);
- int32 ids and positions (Lite turns int64 into int32), rotary cos/sin as precomputed tables (Lite's Cos loses 1e-3),
  LayerNorm and tanh-GELU from elementary ops;
- weights in fp16 (fp32 for ``--quant fp32``), never unpacked in the graph: Lite's converter folds unpacking
  arithmetic into full-size float constants (a 0.79 MB INT4 decode graph became a 67.6 MB MindIR); 8-bit weights
  are the converter's own weight quantization (``appliance.conversion``);
- the query is pre-scaled per layer as THUDM does, so fp16 compute does not overflow.

The model is ``appliance.model.definition`` (the cpu graph's ``Ops`` with these storage, arithmetic and attention
choices).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.conversion import static_input_shapes, static_output_names
from appliance.model.definition import attention_scales, forward, tanh_gelu
from appliance.model.quantize import BITS, quantize_blockwise
from appliance.model.weights import EMBEDDING, LM_HEAD
from model_export.graph import DecoderGraph, QuantSpec

OPSET = 13


class AscendDecoderGraph(DecoderGraph):
    """The cpu graph's model math, rewritten for MindSpore Lite's op set and static shapes."""

    def __init__(self, *args, compute: str = "fp16", capacity: int = 2048, shared: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute = compute
        self.ftype = TensorProto.FLOAT16 if compute == "fp16" else TensorProto.FLOAT
        self.np_ftype = np.float16 if compute == "fp16" else np.float32
        self.capacity = capacity
        self.shared = shared if shared is not None else {}  # the weights an earlier graph already wrote and reported

    # -- weights ------------------------------------------------------------------------------------------------
    def value(self, x) -> str:
        return x if isinstance(x, str) else self.b.const(x, self.np_ftype)

    def to_float(self, x: str) -> str:
        return self.b.op("Cast", [x], to=self.ftype)

    def _compute(self, x: str) -> str:
        """An fp32 value in the compute precision."""
        return x if self.np_ftype == np.float32 else self.to_float(x)

    def _matrix(self, prefix: str, weight) -> str:
        """The weight as a compute-dtype [N, K] tensor, stored in fp16 (fp32 for ``--quant fp32``) and never unpacked
        in the graph: Lite's converter folds such arithmetic into full-size float constants. An int8 bundle's graphs
        hold fp16 too and its converter configs quantize them (``appliance.conversion``); the report then carries
        the error of per-output-channel symmetric 8-bit codes, the scheme that quantization applies."""
        b, quant = self.b, self.spec.weights
        dtype = np.float32 if quant == "fp32" else np.float16
        if prefix not in self.shared:
            self.shared[prefix] = True
            if quant in BITS:
                q = quantize_blockwise(weight, BITS[quant], weight.shape[1])
                self._record(prefix, q.rel_error)
                self.report.linear_bytes += q.packed.nbytes + q.scales.nbytes
            else:
                self._record(prefix, self._cast_error(weight, dtype))
                self.report.linear_bytes += weight.size * np.dtype(dtype).itemsize
        name = b.weight(prefix + ".weight", weight, dtype)
        return name if np.dtype(dtype) == self.np_ftype else b.op("Cast", [name], to=self.ftype)

    def linear(self, prefix: str, x: str) -> str:
        b = self.b
        weight = self.get(prefix + ".weight")
        w = self._matrix(prefix, weight)
        bias = self._compute(b.weight(prefix + ".bias", self.get(prefix + ".bias"), np.float32))
        return b.op("Add", [b.op("MatMul", [x, b.op("Transpose", [w], perm=[1, 0])]), bias])

    def layer_norm(self, prefix: str, x: str) -> str:
        """LayerNorm from elementary ops, statistics in fp32 (fp16 variance of a 4096-wide row can overflow)."""
        b = self.b
        w = b.weight(prefix + ".weight", self.get(prefix + ".weight"), np.float32)
        bias = b.weight(prefix + ".bias", self.get(prefix + ".bias"), np.float32)
        x32 = b.op("Cast", [x], to=TensorProto.FLOAT) if self.np_ftype == np.float16 else x
        centred = b.op("Sub", [x32, b.op("ReduceMean", [x32], axes=[-1], keepdims=1)])
        var = b.op("ReduceMean", [b.op("Mul", [centred, centred])], axes=[-1], keepdims=1)
        normed = b.op("Div", [centred, b.op("Sqrt", [b.op("Add", [var, b.const(self.config.layernorm_epsilon, np.float32)])])])
        return self._compute(b.op("Add", [b.op("Mul", [normed, w]), bias]))

    def gelu(self, x: str) -> str:
        return tanh_gelu(self, x)  # from elementary ops: Lite has no GELU of the tanh form

    def rotary_half(self, row: int) -> tuple[str, str]:
        return tuple(self._compute(table) for table in super().rotary_half(row))

    # -- graph ----------------------------------------------------------------------------------------------------
    def build_static(self, gear: int | None, doc: str) -> onnx.ModelProto:
        """The prefill graph of ``gear`` (prompts right-padded to it), or the one-token decode step (None); inputs as
        ``appliance.conversion.static_input_shapes`` states them (the converter configs repeat those shapes)."""
        cfg, b = self.config, self.b
        heads, hd, cap = cfg.num_heads, cfg.head_dim, self.capacity
        types = {"input_ids": TensorProto.INT32, "position_ids": TensorProto.INT32}
        inputs = [helper.make_tensor_value_info(name, self.ftype if name.startswith("past_") else
                                                types.get(name, TensorProto.FLOAT), shape)
                  for name, shape in static_input_shapes(cfg, cap, gear, "batch").items()]
        logits, *cache = static_output_names(cfg)  # the order runners read them in
        outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", cfg.vocab_size])]
        outputs += [helper.make_tensor_value_info(name, self.ftype, ["batch", heads, cap, hd]) for name in cache]
        self.seq, self.decode = gear or 1, gear is None
        self.shape_qkv = b.const([-1, self.seq, heads, 3 * hd])
        if self.decode:
            self.write = self._compute("write_slot")
        elif self.seq < cap:
            self.empty_rows = self._empty_rows()
        forward(self, "input_ids")
        return b.model(inputs, outputs, OPSET, contrib=False, doc=doc)

    def _empty_rows(self) -> str:
        """Zeros ``[batch, heads, capacity - gear, head_dim]``: the cache rows a prefill leaves empty, appended to its
        keys and values with Concat (Lite 2.0.0 converts a Pad of the sequence axis of these graphs onto the last axis:
        ``[1, 4, 64, 472]`` for ``[1, 4, 512, 24]``). The batch size comes from ``last_position``, whose rows sum to 1."""
        b, cfg = self.b, self.config
        ones = b.op("Unsqueeze", [b.op("ReduceSum", ["last_position", b.const([1])], keepdims=1), b.const([3])])
        zeros = b.op("ConstantOfShape", [b.const([1, cfg.num_heads, self.capacity - self.seq, cfg.head_dim])],
                     value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0]))
        return self._compute(b.op("Mul", [ones, zeros]))  # in fp32: Lite 2.0.0 cannot parse an fp16 ConstantOfShape

    def attention(self, n: int, q: str, k: str, v: str) -> str:
        """THUDM's fp16 arithmetic: q divided and the scores scaled back up in fp32 by ``attention_scales``. The cache
        is the capacity buffers: written whole by a prefill (zero rows after the gear's), one slot by a decode step."""
        cfg, b = self.config, self.b
        hd, cap = cfg.head_dim, self.capacity
        heads_first = {"perm": [0, 2, 1, 3]}
        divisor, coeff = attention_scales(n, hd)
        q = b.op("Mul", [b.op("Transpose", [q], **heads_first), self.value(1 / divisor)])
        k = b.op("Transpose", [k], **heads_first)
        v = b.op("Transpose", [v], **heads_first)
        if self.decode:
            keep = b.op("Sub", [self.value(1.0), self.write])
            k = b.op("Add", [b.op("Mul", [f"past_key.{n}", keep]), b.op("Mul", [k, self.write])], [f"present_key.{n}"])
            v = b.op("Add", [b.op("Mul", [f"past_value.{n}", keep]), b.op("Mul", [v, self.write])],
                     [f"present_value.{n}"])
        elif self.seq < cap:
            b.op("Concat", [k, self.empty_rows], [f"present_key.{n}"], axis=2)
            b.op("Concat", [v, self.empty_rows], [f"present_value.{n}"], axis=2)
        else:
            b.op("Identity", [k], [f"present_key.{n}"])
            b.op("Identity", [v], [f"present_value.{n}"])
        scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = b.op("Cast", [scores], to=TensorProto.FLOAT) if self.np_ftype == np.float16 else scores
        # attention_bias is 0 where visible, MASK_FILL where hidden: after the rescale a hidden score is MASK_FILL x coeff
        probs = b.op("Softmax", [b.op("Mul", [b.op("Add", [scores, "attention_bias"]), b.const(coeff, np.float32)])],
                     axis=-1)
        probs = self._compute(probs)
        return b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [probs, v])], **heads_first),
                                b.const([-1, self.seq, cfg.hidden_size])])

    def embed(self, ids: str) -> str:
        """lm_head as a compute-dtype matrix (shared with the embedding when tied); the embedded input ids."""
        self.head_matrix = self._matrix("lm_head", self.get(LM_HEAD))
        table = self.head_matrix if self.tied else self._matrix(EMBEDDING.removesuffix(".weight"), self.get(EMBEDDING))
        self.on_tensor("lm_head")
        return self.b.op("Gather", [table, ids])

    def output_rows(self, x: str) -> str:
        """The prompt's last real position (``last_position`` is one-hot over the padded gear), or the decode step."""
        b = self.b
        if self.decode:
            return b.op("Reshape", [x, b.const([-1, self.config.hidden_size])])
        return b.op("ReduceSum", [b.op("Mul", [x, self._compute("last_position")]), b.const([1])], keepdims=0)

    def lm_head(self, x: str) -> str:
        b = self.b
        # Gemm reads the [vocab, hidden] table as it is; a Transpose would be folded into a second copy of it
        logits = b.op("Gemm", [x, self.head_matrix], transB=1)
        return b.op("Cast", [logits], ["logits"], to=TensorProto.FLOAT) if self.np_ftype == np.float16 else \
            b.op("Identity", [logits], ["logits"])


def spec_for(quant: str, group_size: int) -> QuantSpec:
    """Ascend stores lm_head/embedding like the block weights (there is no MatMulNBits to favour INT8)."""
    return QuantSpec(weights=quant, group_size=group_size, embeddings=quant, accuracy_level=0)
