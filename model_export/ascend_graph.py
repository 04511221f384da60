"""Graphs for the Ascend targets: static shapes, standard ONNX ops only, a fixed-capacity KV cache.

MindSpore Lite compiles fixed shapes and rejects contrib ops and INT4 tensors, so (facts measured with Lite 2.0.0):
- one prefill graph per sequence gear (the prompt is right-padded to the gear) and a one-token decode graph, all
  reading one weight file;
- the KV cache has a fixed capacity ``C`` (``[batch, heads, C, head_dim]``): prefill returns it padded with zeros,
  decode writes the new token's K/V into the slot selected by a one-hot ``write_slot`` input and attends over the
  whole capacity under an additive validity mask (past length 0 and bool ``Where`` masks fail in Lite);
- int32 ids and positions (Lite turns int64 into int32), rotary cos/sin as precomputed tables (Lite's Cos loses 1e-3),
  LayerNorm and tanh-GELU from elementary ops;
- INT4 weights are packed two per byte and unpacked in the graph with arithmetic (Floor/Mul/Sub), INT8 weights are
  dequantized with Cast/Mul; the query is pre-scaled per layer as THUDM does, so fp16 compute does not overflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.chatglm_ops import ALPHA
from model_export.graph import DecoderGraph, QuantSpec
from model_export.quantize import BITS, effective_group, quantize_blockwise

OPSET = 13


@dataclass(frozen=True)
class AscendProfile:
    """Shapes an Ascend target compiles: cache capacity, prefill gears, batch gears."""

    name: str
    capacity: int
    prefill_gears: tuple[int, ...]
    batch_gears: tuple[int, ...]
    soc_hint: str


PROFILES = {
    # 910B: the model's full 2048-token context, batches up to 4.
    "ascend-910b": AscendProfile("ascend-910b", 2048, (128, 512, 2048), (1, 2, 3, 4), "Ascend910B"),
    # 310B boards share 8 GB between CPU and NPU: INT4 weights ~3.3 GB + fp16 KV 1024 x 448 KiB = 0.46 GB + runtime.
    "ascend-310b": AscendProfile("ascend-310b", 1024, (64, 256, 1024), (1,), "Ascend310B"),
}


class AscendDecoderGraph(DecoderGraph):
    """The cpu graph's model math, rewritten for MindSpore Lite's op set and static shapes."""

    def __init__(self, *args, compute: str = "fp16", capacity: int = 2048, shared: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute = compute
        self.ftype = TensorProto.FLOAT16 if compute == "fp16" else TensorProto.FLOAT
        self.np_ftype = np.float16 if compute == "fp16" else np.float32
        self.capacity = capacity
        self.shared = shared if shared is not None else {}  # initializer names per weight, reused by every graph

    # -- weights ------------------------------------------------------------------------------------------------
    def _once(self, key: str, make) -> list[str]:
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]

    def _const(self, value) -> str:
        return self.b.const(value, self.np_ftype)

    def _matrix(self, prefix: str, weight) -> str:
        """The weight as a compute-dtype [N, K] tensor: stored per the spec, dequantized in the graph if packed."""
        b, spec = self.b, self.spec
        n, k = weight.shape
        if spec.weights not in BITS:
            dtype = np.float32 if spec.weights == "fp32" else np.float16
            name = b.weight(prefix + ".weight", weight, dtype)
            return name if np.dtype(dtype) == self.np_ftype else b.op("Cast", [name], to=self.ftype)
        bits = BITS[spec.weights]

        def store() -> list[str]:
            q = quantize_blockwise(weight, bits, effective_group(k, spec.group_size))
            self._record(prefix, q.rel_error)
            self.report.linear_bytes += q.packed.nbytes + q.scales.size * 2
            return [b.weight(prefix + ".packed", q.packed.reshape(n, -1)),
                    b.weight(prefix + ".scales", q.scales, np.float16), str(q.group_size)]

        packed, scales, group = self._once(prefix, store)
        b.reuse(packed)
        b.reuse(scales)
        codes = b.op("Cast", [packed], to=self.ftype)  # [N, K*bits/8] byte values
        if bits == 4:  # two codes per byte, low nibble first
            high = b.op("Floor", [b.op("Div", [codes, self._const(16)])])
            low = b.op("Sub", [codes, b.op("Mul", [high, self._const(16)])])
            pair = b.op("Concat", [b.op("Unsqueeze", [low, b.const([-1])]), b.op("Unsqueeze", [high, b.const([-1])])],
                        axis=-1)
            codes = b.op("Reshape", [pair, b.const([n, -1])])
        blocks = b.op("Reshape", [b.op("Sub", [codes, self._const(2 ** (bits - 1))]), b.const([n, -1, int(group)])])
        scale = b.op("Unsqueeze", [b.op("Cast", [scales], to=self.ftype), b.const([-1])])
        full = b.op("Reshape", [b.op("Mul", [blocks, scale]), b.const([n, -1])])
        return b.op("Slice", [full, b.const([0]), b.const([k]), b.const([1])])

    def linear(self, x: str, prefix: str, with_bias: bool = True) -> str:
        b = self.b
        weight = self.get(prefix + ".weight")
        w = self._matrix(prefix, weight)
        bias = b.weight(prefix + ".bias", self.get(prefix + ".bias"), np.float32)
        bias = bias if self.np_ftype == np.float32 else b.op("Cast", [bias], to=self.ftype)
        return b.op("Add", [b.op("MatMul", [x, b.op("Transpose", [w], perm=[1, 0])]), bias])

    def _layer_norm(self, x: str, prefix: str) -> str:
        """LayerNorm from elementary ops, statistics in fp32 (fp16 variance of a 4096-wide row can overflow)."""
        b = self.b
        w = b.weight(prefix + ".weight", self.get(prefix + ".weight"), np.float32)
        bias = b.weight(prefix + ".bias", self.get(prefix + ".bias"), np.float32)
        x32 = b.op("Cast", [x], to=TensorProto.FLOAT) if self.np_ftype == np.float16 else x
        centred = b.op("Sub", [x32, b.op("ReduceMean", [x32], axes=[-1], keepdims=1)])
        var = b.op("ReduceMean", [b.op("Mul", [centred, centred])], axes=[-1], keepdims=1)
        normed = b.op("Div", [centred, b.op("Sqrt", [b.op("Add", [var, b.const(self.cfg.layernorm_epsilon, np.float32)])])])
        out = b.op("Add", [b.op("Mul", [normed, w]), bias])
        return b.op("Cast", [out], to=self.ftype) if self.np_ftype == np.float16 else out

    def _gelu(self, x: str) -> str:
        b, c = self.b, self._const
        inner = b.op("Mul", [b.op("Mul", [x, c(0.7978845608028654)]),
                             b.op("Add", [c(1.0), b.op("Mul", [c(0.044715), b.op("Mul", [x, x])])])])
        return b.op("Mul", [b.op("Mul", [x, c(0.5)]), b.op("Add", [c(1.0), b.op("Tanh", [inner])])])

    # -- graph ----------------------------------------------------------------------------------------------------
    def build_static(self, seq: int, decode: bool, doc: str) -> onnx.ModelProto:
        cfg, b = self.cfg, self.b
        h, heads, hd, cap = cfg.hidden_size, cfg.num_heads, cfg.head_dim, self.capacity
        keys = cap if decode else seq
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", seq]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT32, ["batch", 2, seq]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", 1, seq, keys])]
        inputs.append(helper.make_tensor_value_info("write_slot", TensorProto.FLOAT, ["batch", 1, cap, 1]) if decode
                      else helper.make_tensor_value_info("last_position", TensorProto.FLOAT, ["batch", seq, 1]))
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])]
        for n in range(cfg.num_layers):
            for kind in ("key", "value"):
                if decode:
                    inputs.append(helper.make_tensor_value_info(f"past_{kind}.{n}", self.ftype, ["batch", heads, cap, hd]))
                outputs.append(helper.make_tensor_value_info(f"present_{kind}.{n}", self.ftype, ["batch", heads, cap, hd]))
        self.seq, self.decode = seq, decode
        self.shape_qkv = b.const([-1, seq, heads, 3 * hd])
        if decode:
            self.write = b.op("Cast", ["write_slot"], to=self.ftype) if self.np_ftype == np.float16 else "write_slot"
        head, embed = self._tables()
        x = embed
        self.cos, self.sin = self._rotary()
        if self.np_ftype == np.float16:
            self.cos, self.sin = (b.op("Cast", [t], to=self.ftype) for t in (self.cos, self.sin))
        for n in range(cfg.num_layers):
            x = self._block(n, x)
        pick = b.op("Cast", ["last_position"], to=self.ftype) if not decode and self.np_ftype == np.float16 \
            else ("last_position" if not decode else None)
        last = b.op("ReduceSum", [b.op("Mul", [x, pick]), b.const([1])], keepdims=0) if pick else \
            b.op("Reshape", [x, b.const([-1, h])])
        logits = head(self._layer_norm(last, "transformer.final_layernorm"))
        b.op("Cast", [logits], ["logits"], to=TensorProto.FLOAT) if self.np_ftype == np.float16 else \
            b.op("Identity", [logits], ["logits"])
        return b.model(inputs, outputs, OPSET, contrib=False, doc=doc)

    def _block(self, n: int, x: str) -> str:
        cfg, b, p = self.cfg, self.b, f"transformer.layers.{n}."
        hd, cap = cfg.head_dim, self.capacity
        ln1 = self._layer_norm(x, p + "input_layernorm")
        qkv = b.op("Reshape", [self.linear(ln1, p + "attention.query_key_value"), self.shape_qkv])
        q, k, v = b.op("Split", [qkv], outputs=3, axis=-1)
        heads_first = {"perm": [0, 2, 1, 3]}
        coeff = float(n + 1)
        # THUDM's fp16 trick: divide q by sqrt(hd) * (layer + 1), then scale the scores back up in fp32.
        q = b.op("Mul", [b.op("Transpose", [self._rotate(q)], **heads_first), self._const(1 / (np.sqrt(hd) * coeff))])
        k = b.op("Transpose", [self._rotate(k)], **heads_first)
        v = b.op("Transpose", [v], **heads_first)
        if self.decode:
            keep = b.op("Sub", [self._const(1.0), self.write])
            k = b.op("Add", [b.op("Mul", [f"past_key.{n}", keep]), b.op("Mul", [k, self.write])], [f"present_key.{n}"])
            v = b.op("Add", [b.op("Mul", [f"past_value.{n}", keep]), b.op("Mul", [v, self.write])],
                     [f"present_value.{n}"])
        else:
            pads = b.const([0, 0, 0, 0, 0, 0, cap - self.seq, 0])
            b.op("Pad", [k, pads], [f"present_key.{n}"])
            b.op("Pad", [v, pads], [f"present_value.{n}"])
        scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = b.op("Cast", [scores], to=TensorProto.FLOAT) if self.np_ftype == np.float16 else scores
        # attention_mask is additive (0 visible, -10000 masked): after the rescale a masked score is -10000 x (layer + 1)
        probs = b.op("Softmax", [b.op("Mul", [b.op("Add", [scores, "attention_mask"]), b.const(coeff, np.float32)])],
                     axis=-1)
        probs = b.op("Cast", [probs], to=self.ftype) if self.np_ftype == np.float16 else probs
        context = b.op("Reshape", [b.op("Transpose", [b.op("MatMul", [probs, v])], **heads_first),
                                   b.const([-1, self.seq, cfg.hidden_size])])
        alpha = self._const(ALPHA)
        x = b.op("Add", [b.op("Mul", [ln1, alpha]), self.linear(context, p + "attention.dense")])
        ln2 = self._layer_norm(x, p + "post_attention_layernorm")
        up = self._gelu(self.linear(ln2, p + "mlp.dense_h_to_4h"))
        return b.op("Add", [b.op("Mul", [ln2, alpha]), self.linear(up, p + "mlp.dense_4h_to_h")])

    def _tables(self):
        """lm_head as a compute-dtype matrix (shared with the embedding when tied) and the embedded input ids."""
        b = self.b
        head_weight = self.get("lm_head.weight")
        head = self._matrix("lm_head", head_weight)
        table = head if self.tied else \
            self._matrix("transformer.word_embeddings", self.get("transformer.word_embeddings.weight"))
        self.on_tensor("lm_head")
        embed = b.op("Gather", [table, "input_ids"])

        def head_matmul(x: str) -> str:
            return b.op("MatMul", [x, b.op("Transpose", [head], perm=[1, 0])])

        return head_matmul, embed


def spec_for(quant: str, group_size: int) -> QuantSpec:
    """Ascend stores lm_head/embedding like the block weights (there is no MatMulNBits to favour INT8)."""
    return QuantSpec(weights=quant, group_size=group_size, embeddings=quant, accuracy_level=0)
