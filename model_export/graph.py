"""The ``cpu`` target's decoder graph: ChatGLM-6B written op by op for onnxruntime (no tracing).

One graph serves prefill and decode; each layer's attention is an ``If`` on whether the cache is empty:

* prefill (``past_*`` have 0 positions): attention over the prompt with ChatGLM's prefix mask ``prefix_mask``
  ``[batch, 1, seq, seq]`` (bool, True = masked); the prompt's keys/values come out as ``present_*`` padded to
  ``cache_capacity`` positions.
* decode (``past_*`` are those capacity buffers): GroupQueryAttention writes the new position into the buffer in place
  (the caller binds ``present_*`` to the same memory as ``past_*``) and attends to every cached position, which is
  exactly ChatGLM's decode mask. It reads ``total_length`` ``[batch]`` int32, the positions cached after this step
  (past + 1); ``prefix_mask`` is then ``[batch, 1, 1, 1]`` and unread.

So a decode step copies no cache: at context 2000 a Concat-based cache copied 1.8 GB per token. The cache is
``[batch, heads, capacity, head_dim]``, fp16 (half the memory; GroupQueryAttention then takes fp16 query/key/value,
cast from the fp32 activations, and its context is cast back) or fp32 for exact (fp32-weight) bundles:
``default_kv_cache``. Logits only for the last position. Activations are kept 2-D ``[batch*seq, hidden]`` between
attention blocks so every linear layer is one Gemm or MatMulNBits.

The model is ``appliance.model.definition``: ``DecoderGraph`` implements its operations on ONNX value names, so the
graph's steps, constants and rotary come from there; attention, weight storage and the tables are this module's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.model.definition import MASK_FILL, forward, net_attention_scale, rotary_half_table
from appliance.model.quantize import BITS, effective_group, quantize_blockwise
from appliance.model.weights import EMBEDDING, LM_HEAD, dequantize
from appliance.model_config import KV_CACHE_DTYPES, ModelConfig
from model_export.onnx_builder import GraphBuilder

OPSET = 17
FLOAT = TensorProto.FLOAT
PROMPT_CHUNK = 64  # prompt queries per attention chunk (bounded scores memory; docs/performance.md)
TensorSource = Callable[[str], np.ndarray]
KV_CACHE_TYPES = {name: helper.np_dtype_to_tensor_dtype(dtype) for name, dtype in KV_CACHE_DTYPES.items()}


def default_kv_cache(weights: str) -> str:
    """fp16 for every bundle but fp32 ones: those are verified to fp32 rounding (verify.THRESHOLDS), and the rounding
    of an fp16 cache is larger (docs/performance.md, the KV cache in fp16)."""
    return "fp32" if weights == "fp32" else "fp16"


@dataclass(frozen=True)
class QuantSpec:
    """How the exported graph stores its numbers: block linears, the embedding / lm_head tables (the manifest's
    ``quant``) and the decoder graph's KV cache (its ``graphs.kv_cache``)."""

    weights: str  # int4 | int8 | fp16 | fp32
    group_size: int = 128
    embeddings: str = "fp16"  # fp16 | fp32 | int8 | int4 (lm_head at this precision; the embedding shares it when tied)
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fastest on AVX512-VNNI/AVX2), 0 = fp32
    kv_cache: str = "fp32"  # a KV_CACHE_DTYPES name; the exporter passes default_kv_cache(weights) unless asked

    def to_dict(self) -> dict:
        return {"weights": self.weights, "group_size": self.group_size if self.weights in BITS else None,
                "symmetric": True, "embeddings": self.embeddings, "accuracy_level": self.accuracy_level}


@dataclass
class QuantReport:
    """Per-matrix relative Frobenius error of the stored weights, and their bytes."""

    errors: dict[str, float] = field(default_factory=dict)
    linear_bytes: int = 0
    table_bytes: int = 0

    def summary(self) -> dict:
        if not self.errors:
            return {"matrices": 0}
        values = np.array(list(self.errors.values()))
        worst = max(self.errors, key=self.errors.get)
        return {"matrices": len(values), "mean": float(values.mean()), "max": float(values.max()), "worst": worst,
                "linear_bytes": self.linear_bytes, "table_bytes": self.table_bytes}


class DecoderGraph:
    """Writes one ChatGLM-6B decoder graph; weights are read from ``source`` and stored per ``spec``. Implements the
    definition's ``Ops`` (and ``weights.DequantOps``) on value names."""

    def __init__(self, cfg: ModelConfig, source: TensorSource, spec: QuantSpec, builder: GraphBuilder,
                 tied: bool, max_positions: int, on_tensor: Callable[[str], None] = lambda name: None) -> None:
        self.config, self.get, self.spec, self.b = cfg, source, spec, builder
        self.tied, self.max_positions, self.on_tensor = tied, max_positions, on_tensor
        self.kv_type = KV_CACHE_TYPES[spec.kv_cache]
        self.report = QuantReport()
        self.rotary: tuple[str, str, list[str]] | None = None  # cos and sin tables, the two position rows

    # -- weights ---------------------------------------------------------------------------------------------
    def _record(self, name: str, error: float) -> None:
        self.report.errors[name] = error
        self.on_tensor(name)

    @staticmethod
    def _cast_error(weight: np.ndarray, dtype) -> float:
        """Relative error of storing ``weight`` as ``dtype`` (0 when nothing is rounded)."""
        if weight.dtype == dtype or np.dtype(dtype) == np.float32:
            return 0.0
        w = np.asarray(weight, np.float32)
        return float(np.linalg.norm(w - w.astype(dtype).astype(np.float32)) / np.linalg.norm(w))

    def linear(self, prefix: str, x: str) -> str:
        """``x [M, K] @ W.T + b`` with W stored per the spec."""
        b, spec = self.b, self.spec
        weight = self.get(prefix + ".weight")
        n, k = weight.shape
        bias = b.weight(prefix + ".bias", self.get(prefix + ".bias"), np.float32)
        if spec.weights in BITS:
            q = quantize_blockwise(weight, BITS[spec.weights], effective_group(k, spec.group_size))
            self.report.linear_bytes += q.nbytes
            self._record(prefix, q.rel_error)
            packed = b.weight(prefix + ".qweight", q.packed)
            scales = b.weight(prefix + ".scales", q.scales)
            return b.op("MatMulNBits", [x, packed, scales, "", "", bias], domain="com.microsoft", K=k, N=n,
                        bits=q.bits, block_size=q.group_size, accuracy_level=spec.accuracy_level)
        dtype = np.float16 if spec.weights == "fp16" else np.float32
        w = b.weight(prefix + ".weight", weight, dtype)
        self.report.linear_bytes += weight.size * np.dtype(dtype).itemsize
        self._record(prefix, self._cast_error(weight, dtype))
        if dtype == np.float16:
            w = b.op("Cast", [w], to=TensorProto.FLOAT)  # folded into an fp32 initializer when the session loads
        return b.op("Gemm", [x, w, bias], transB=1)

    # -- graph -------------------------------------------------------------------------------------------------
    def build(self, doc: str) -> onnx.ModelProto:
        cfg, b = self.config, self.b
        h, heads, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", 2, "seq"]),
                  helper.make_tensor_value_info("prefix_mask", TensorProto.BOOL, ["batch", 1, "seq", "seq"]),
                  helper.make_tensor_value_info("total_length", TensorProto.INT32, ["batch"]),
                  helper.make_tensor_value_info("cache_capacity", TensorProto.INT64, [])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])]
        for n in range(cfg.num_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_{kind}.{n}", self.kv_type,
                                                            ["batch", heads, "past", hd]))
                outputs.append(helper.make_tensor_value_info(f"present_{kind}.{n}", self.kv_type,
                                                             ["batch", heads, "capacity", hd]))

        batch_seq = b.op("Shape", ["input_ids"])
        self.shape_bsh = b.op("Concat", [batch_seq, b.const([h])], axis=0)
        self.shape_qkv = b.op("Concat", [batch_seq, b.const([heads, 3 * hd])], axis=0)
        self._attention_inputs()
        forward(self, "input_ids")
        return b.model(inputs, outputs, OPSET, contrib=True, doc=doc)

    # -- the definition's operations ------------------------------------------------------------------------------
    def value(self, x) -> str:
        """A value name as it is; a number or numpy array as a constant in the graph's float type."""
        return x if isinstance(x, str) else self.b.const(x, np.float32)

    def add(self, a, b) -> str:
        return self.b.op("Add", [self.value(a), self.value(b)])

    def sub(self, a, b) -> str:
        return self.b.op("Sub", [self.value(a), self.value(b)])

    def mul(self, a, b) -> str:
        return self.b.op("Mul", [self.value(a), self.value(b)])

    def div(self, a, b) -> str:
        return self.b.op("Div", [self.value(a), self.value(b)])

    def floor(self, x: str) -> str:
        return self.b.op("Floor", [x])

    def tanh(self, x: str) -> str:
        return self.b.op("Tanh", [x])

    def to_float(self, x: str) -> str:
        return self.b.op("Cast", [x], to=FLOAT)

    def split(self, x: str, parts: int) -> list[str]:
        return self.b.op("Split", [x], outputs=parts, axis=-1)

    def concat(self, xs: list[str]) -> str:
        return self.b.op("Concat", xs, axis=-1)

    def pair(self, a: str, b: str) -> str:
        return self.concat([self.unsqueeze_last(a), self.unsqueeze_last(b)])

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.b.op("Reshape", [x, self.b.const(shape)])

    def unsqueeze_last(self, x: str) -> str:
        return self.b.op("Unsqueeze", [x, self.b.const([-1])])

    def slice_last(self, x: str, length: int) -> str:
        b = self.b
        return b.op("Slice", [x, b.const([0]), b.const([length]), b.const([-1])])

    def split_heads(self, x: str, parts: int) -> list[str]:
        return self.split(self.b.op("Reshape", [x, self.shape_qkv]), parts)

    def gelu(self, x: str) -> str:
        return self.b.op("FastGelu", [x], domain="com.microsoft")  # onnxruntime's tanh GELU

    def layer_norm(self, prefix: str, x: str) -> str:
        b = self.b
        return b.op("LayerNormalization", [x, b.weight(prefix + ".weight", self.get(prefix + ".weight"), np.float32),
                                           b.weight(prefix + ".bias", self.get(prefix + ".bias"), np.float32)],
                    axis=-1, epsilon=self.config.layernorm_epsilon)

    def rotary_half(self, row: int) -> tuple[str, str]:
        """The tables over every position, stored once, gathered at position row ``row``: [batch, seq, 1, rotary_dim]."""
        b = self.b
        if self.rotary is None:
            cos, sin = rotary_half_table(np.arange(self.max_positions), self.config.rotary_dim)
            self.rotary = (b.weight("rotary.cos", cos), b.weight("rotary.sin", sin),
                           b.op("Split", ["position_ids"], outputs=2, axis=1))
        cos, sin, rows = self.rotary
        index = b.op("Squeeze", [rows[row], b.const([1])])
        return tuple(b.op("Unsqueeze", [b.op("Gather", [table, index]), b.const([2])]) for table in (cos, sin))

    def embed(self, ids: str) -> str:
        self.head, embedded = self._tables()
        return self.b.op("Reshape", [embedded, self.b.const([-1, self.config.hidden_size])])

    def output_rows(self, x: str) -> str:
        return self.b.op("Gather", [self.b.op("Reshape", [x, self.shape_bsh]), self.b.const(-1)], axis=1)  # [batch, h]

    def lm_head(self, x: str) -> str:
        return self.head(x, "logits")

    def _attention_inputs(self) -> None:
        """Shared by every layer: prefill or decode, the cache padding, and GQA's length inputs."""
        b = self.b
        self.is_prefill = b.op("Equal", [b.op("Shape", ["past_key.0"], start=2, end=3), b.const([0])])
        seq = b.op("Shape", ["input_ids"], start=1, end=2)
        self.cache_pads = b.op("Concat", [b.const([0] * 6), b.op("Sub", ["cache_capacity", seq]), b.const([0])], axis=0)
        self.total = b.op("ReduceMax", ["total_length"], keepdims=0)  # GQA's scalar total_sequence_length
        self.seqlens_k = b.op("Sub", ["total_length", b.const([1], np.int32)])  # GQA counts the new token's slot

    def attention(self, n: int, q: str, k: str, v: str) -> str:
        """Attention of one layer for ``q``/``k``/``v`` ``[batch, seq, heads, head_dim]``; returns ``[batch*seq, hidden]``."""
        b, cfg = self.b, self.config
        to_heads = {"perm": [0, 2, 1, 3]}
        flat = b.const([-1, cfg.hidden_size])

        prefill = b.branch()
        qt, kt, vt = (prefill.op("Transpose", [t], **to_heads) for t in (q, k, v))
        kc, vc = (self._to_cache(prefill, t) for t in (kt, vt))
        if self.kv_type != FLOAT:  # the prompt attends to the keys/values as cached, as every later step does
            kt, vt = (prefill.op("Cast", [t], to=FLOAT) for t in (kc, vc))
        prefill_out = [prefill.op("Reshape", [self._prompt_attention(prefill, qt, kt, vt), flat]),
                       *(prefill.op("Pad", [t, self.cache_pads]) for t in (kc, vc))]

        decode = b.branch()
        rows = b.const([0, 0, -1])  # [batch, seq, hidden]
        context, key, value = decode.op(
            "GroupQueryAttention", [self._to_cache(decode, decode.op("Reshape", [t, rows])) for t in (q, k, v)]
            + [f"past_key.{n}", f"past_value.{n}", self.seqlens_k, self.total], outputs=3, domain="com.microsoft",
            num_heads=cfg.num_heads, kv_num_heads=cfg.num_heads, scale=net_attention_scale(cfg.head_dim))
        if self.kv_type != FLOAT:
            context = decode.op("Cast", [context], to=FLOAT)
        decode_out = [decode.op("Reshape", [context, flat]), key, value]

        types = [FLOAT, self.kv_type, self.kv_type]  # context, present key, present value
        return b.op("If", [self.is_prefill], [b.fresh("context"), f"present_key.{n}", f"present_value.{n}"],
                    then_branch=prefill.subgraph(f"prefill_{n}", list(zip(prefill_out, types, strict=True))),
                    else_branch=decode.subgraph(f"decode_{n}", list(zip(decode_out, types, strict=True))))[0]

    def _to_cache(self, g: GraphBuilder, x: str) -> str:
        """``x`` (fp32) in the cache's element type: what GroupQueryAttention takes and the cache stores."""
        return x if self.kv_type == FLOAT else g.op("Cast", [x], to=self.kv_type)

    def _prompt_attention(self, g: GraphBuilder, qt: str, kt: str, vt: str) -> str:
        """Prefix-masked attention over the prompt, ``PROMPT_CHUNK`` queries at a time: the scores of a 2000-token
        prompt are 0.5 GB per layer at once (three copies: scores, masked, softmax), 16 MB per chunk. The chunks are
        gathered by Concat; its repeated copying (~15 GB over 28 layers) is about 1% of such a prefill. Returns
        ``[batch, seq, hidden]``."""
        b, cfg = self.b, self.config
        body, step, cond = g.branch(), b.fresh("chunk"), b.fresh("cond")
        start = body.op("Unsqueeze", [body.op("Mul", [step, b.const(PROMPT_CHUNK)]), b.const([0])])
        rows = [start, body.op("Add", [start, b.const([PROMPT_CHUNK])]), b.const([2])]
        scores = body.op("FusedMatMul", [body.op("Slice", [qt, *rows]), kt], domain="com.microsoft", transB=1,
                         alpha=net_attention_scale(cfg.head_dim))
        scores = body.op("Where", [body.op("Slice", ["prefix_mask", *rows]), b.const(MASK_FILL, np.float32), scores])
        context = body.op("MatMul", [body.op("Softmax", [scores], axis=-1), vt])  # [batch, heads, chunk, head_dim]
        context = body.op("Reshape", [body.op("Transpose", [context], perm=[0, 2, 1, 3]), b.const([0, 0, -1])])
        done_in, cond_out = b.fresh("done"), body.op("Identity", [cond])
        done_next = body.op("Concat", [done_in, context], axis=1)  # [batch, rows so far, hidden]

        seq = g.op("Shape", [qt], start=2, end=3)
        chunks = g.op("Squeeze", [g.op("Div", [g.op("Add", [seq, b.const([PROMPT_CHUNK - 1])]), b.const([PROMPT_CHUNK])])])
        empty = g.op("ConstantOfShape", [g.op("Concat", [g.op("Shape", [qt], end=1), b.const([0, cfg.hidden_size])],
                                                         axis=0)], value=helper.make_tensor("", FLOAT, [1], [0.0]))
        loop_body = body.subgraph("prompt_chunk", [(cond_out, TensorProto.BOOL), (done_next, FLOAT)],
                                  [(step, TensorProto.INT64, []), (cond, TensorProto.BOOL, []),
                                   (done_in, FLOAT, ["batch", "rows", cfg.hidden_size])])
        return g.op("Loop", [chunks, "", empty], body=loop_body)

    def _tables(self) -> tuple[Callable[[str, str], str], str]:
        """Store lm_head and the word embedding; return (lm_head writer, embedded input_ids [batch, seq, hidden]).

        When lm_head equals the embedding it is stored once: fp tables feed both Gather and Gemm(transB); quantized
        tables feed MatMulNBits and a Gather that dequantizes only the rows it picks.
        """
        b, spec = self.b, self.spec
        emb_name, head_name = EMBEDDING, LM_HEAD
        if spec.embeddings in BITS:
            head = self.get(head_name)
            q = quantize_blockwise(head, BITS[spec.embeddings], effective_group(head.shape[1], spec.group_size))
            self._record("lm_head", q.rel_error)
            self.report.table_bytes += q.nbytes
            packed, scales = b.weight("lm_head.qweight", q.packed), b.weight("lm_head.scales", q.scales)
            attrs = {"K": q.k, "N": q.n, "bits": q.bits, "block_size": q.group_size,
                     "accuracy_level": spec.accuracy_level}
            del q  # written out; do not keep 0.5 GB of codes alive for the rest of the export

            def head_q(x: str, out: str) -> str:
                return b.op("MatMulNBits", [x, packed, scales], [out], domain="com.microsoft", **attrs)

            if self.tied:  # embedding rows dequantized from the head's tables
                rows = [b.op("Gather", [table, "input_ids"]) for table in (packed, scales)]
                return head_q, dequantize(self, *rows, attrs["bits"], attrs["K"], row_axes=2)
            return head_q, self._gather_fp(emb_name, np.float16)
        dtype = np.float32 if spec.embeddings == "fp32" else np.float16
        head = self.get(head_name)
        table = b.weight(emb_name if self.tied else head_name, head, dtype)
        self.report.table_bytes += head.size * np.dtype(dtype).itemsize
        self._record("lm_head", self._cast_error(head, dtype))
        head_table = b.op("Cast", [table], to=TensorProto.FLOAT) if dtype == np.float16 else table

        def head_fp(x: str, out: str) -> str:
            return b.op("Gemm", [x, head_table], [out], transB=1)

        if not self.tied:
            return head_fp, self._gather_fp(emb_name, dtype)
        rows = b.op("Gather", [table, "input_ids"])
        return head_fp, b.op("Cast", [rows], to=TensorProto.FLOAT) if dtype == np.float16 else rows

    def _gather_fp(self, name: str, dtype) -> str:
        b = self.b
        table = self.get(name)
        self.report.table_bytes += table.size * np.dtype(dtype).itemsize
        rows = b.op("Gather", [b.weight(name, table, dtype), "input_ids"])
        return b.op("Cast", [rows], to=TensorProto.FLOAT) if dtype == np.float16 else rows
