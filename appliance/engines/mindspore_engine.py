"""An Ascend bundle's model on MindSpore itself: ``appliance.model.definition`` as MindSpore Cells in GRAPH_MODE.

The same Python runs on the CPU here and on an Ascend NPU where CANN is installed, so this engine checks the Ascend
path's model code on any machine. What it keeps on the device, loaded once:
- the weights, read from the bundle's device graphs' external data (``weights.onnx.data``, names as the checkpoint's;
  on the CPU (``EngineOptions.device`` cpu) computed in fp32, fp16 weights widened; on an Ascend NPU (``ascend``) in
  fp16 with LayerNorm, softmax and logits in fp32), as Parameters shared by every compiled graph. The matrices can be
  held as codes quantized at load (``weights_format``): int8 per output row (an int8 bundle's, as its converter
  config asks of MindSpore Lite), or int4 in groups along the input (the export's INT4, with the vocabulary table in
  int8 as the export keeps it). On an NPU whose MindSpore has the fused antiquant matmul (``WeightQuantBatchMatmul``)
  the codes go to it; elsewhere they are dequantized inside the graph a block of rows at a time, each block (codes and
  scales) after the previous block's product, so one block's temporaries are live (``WIDEN_ELEMENTS``; an int4 block
  a quarter of it, ``INT4_TEMPORARIES``);
- the KV cache, one Parameter per layer and kind, ``[heads, capacity, head_dim]``, written in place by each call
  (``ScatterNdUpdate`` at the call's slots) and read where it lies: no cache crosses the host.

One Cell per graph of the bundle (``prefill:<gear>`` and ``decode``), each compiled once for its shapes. They run the
StaticSequence's inputs (``appliance.engines.static``): the prompt right-padded to its gear under an additive
prefix-LM bias, a one-token step at a write slot. Per call only ids, positions, the bias row(s), the write slots and
the last-row index go in and logits come out.

MindSpore's graph compiler cannot hand tensors to a per-call ``Ops`` object (``jit_class`` instances take constants
only; attributes set in ``construct`` are not seen by the methods it calls; an ``ops.assign`` into a Parameter at the
start of ``construct`` was read stale by the first call), so the runner writes each call's positions, bias, slots and
last row into small Parameters of the Cell (``feed``) and ``construct(ids)`` runs ``forward``; the ``Ops`` methods
read them there. MindSpore 2.10's extension is built against numpy 1.x: with numpy 2 its eager (PyNative) tensor
methods fail ("numpy.core.multiarray failed to import") and so does a numpy value inside a graph, while compiled
graphs, ``Tensor(array)``, ``set_data`` and ``asnumpy`` work; so everything here runs compiled and the graphs hold no
numpy values.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import TYPE_CHECKING

import numpy as np

from appliance.engines import EngineOptions
from appliance.engines.static import StaticEngine, static_engine
from appliance.errors import BundleError, EngineError
from appliance.folders import cache_dir
from appliance.model.definition import MASK_FILL, attention_scales, forward, rotary_half_table, tanh_gelu
from appliance.model.quantize import BITS, effective_group, quantize_blockwise
from appliance.model.weights import (
    EMBEDDING,
    FINAL_NORM,
    INPUT_NORM,
    LM_HEAD,
    POST_ATTENTION_NORM,
    dequantize,
    expected_shapes,
    pack_nibbles,
    unpack_nibbles,
    zero_point,
)
from appliance.model_config import ModelConfig

if TYPE_CHECKING:
    from appliance.bundle import Bundle

ROTARY_TABLES = ("rotary.cos", "rotary.sin")  # the graphs' own position tables: computed here from the definition
STORED = {1: np.float32, 10: np.float16}  # ONNX TensorProto data types the Ascend graphs store weights in
WIDEN_ELEMENTS = 1 << 25  # quantized weight values widened at a time: 128 MiB in fp32 (8192 rows at width 4096)
INT4_TEMPORARIES = 4  # an int4 block widens a quarter as many: its unpacking holds ~4 widened-size values at once
INT4_GROUP = 128  # the export's default INT4 group size (``effective_group`` narrows it for narrow matrices)
# EngineOptions.device -> (MindSpore's device target, the compute dtype): fp16 on the NPU as the Ascend graphs compute,
# with LayerNorm statistics, softmax and logits in fp32; fp32 on the CPU
DEVICES = {"cpu": ("CPU", np.float32), "ascend": ("Ascend", np.float16)}


def read_weights(bundle: Bundle) -> dict[str, np.ndarray]:
    """The model's tensors from the decode device graph's external data, by checkpoint name: read-only memory maps in
    the stored type (ModelState converts one at a time, so loading never holds the model twice)."""
    import onnx

    graph = bundle.path / bundle.manifest["graphs"]["device"]["decode"]
    model = onnx.load(str(graph), load_external_data=False)
    weights = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.name in ROTARY_TABLES:
            continue
        entry = {item.key: item.value for item in tensor.external_data}
        dtype = STORED.get(tensor.data_type)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if dtype is None or int(entry.get("length", -1)) != count * np.dtype(dtype).itemsize:
            raise BundleError(f"{bundle.path}: {graph.name} stores {tensor.name} in a type or size this engine does "
                              "not read; re-export the bundle")
        # Bundle.open checked that every location is a listed file and the range lies inside it
        weights[tensor.name] = np.memmap(bundle.path / entry["location"], dtype=dtype, mode="r",
                                         offset=int(entry.get("offset", 0)), shape=tuple(tensor.dims))
    if EMBEDDING not in weights and LM_HEAD in weights:
        weights[EMBEDDING] = weights[LM_HEAD]  # tied: stored once, as lm_head (ModelState keeps one copy)
    wrong = [name for name, shape in expected_shapes(bundle.config).items()
             if name not in weights or weights[name].shape != shape]
    if wrong:
        raise BundleError(f"{bundle.path}: {graph.name} lacks {wrong[0]} or stores it in another shape than the "
                          "manifest's model config gives; re-export the bundle")
    return weights


def _mindspore():
    """MindSpore in GRAPH_MODE. A graph that fails to compile makes MindSpore write ``rank_0/om/analyze_fail.ir``
    under ``MS_OM_PATH`` (read when it writes), else under the working directory: pointed into StreamChat's cache."""
    try:
        import mindspore
    except ImportError as exc:
        raise EngineError(f"the mindspore engine needs MindSpore: pip install 'streamchat[mindspore]' ({exc})") from None
    os.environ.setdefault("MS_OM_PATH", str(cache_dir() / "mindspore"))
    mindspore.set_context(mode=mindspore.GRAPH_MODE)
    return mindspore


def select_device(device: str, device_id: int):
    """MindSpore set to compile for ``device`` (a key of DEVICES) card ``device_id``. Without an Ascend build of
    MindSpore and CANN, MindSpore refuses the Ascend target ("Unsupported device target Ascend ..."): one line. The
    device is set once per process (MindSpore refuses another once its runtime ran a kernel)."""
    ms = _mindspore()
    target = DEVICES[device][0]
    if ms.get_context("device_target") == target and (device == "cpu" or ms.get_context("device_id") == device_id):
        return ms
    try:
        ms.set_device(target, *([device_id] if device != "cpu" else []))
    except RuntimeError as exc:
        first = ". ".join(next((line for line in str(exc).splitlines() if line.strip()), "").split(". ")[:2])
        what = "no Ascend device or CANN found" if device == "ascend" else "MindSpore cannot compute on the CPU"
        raise EngineError(f"{what} (MindSpore {ms.__version__}, device {device}, card {device_id}): "
                          f"{first[:160]}") from None
    return ms


def int8_codes(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel 8-bit codes of ``weight [N, K]`` (int8) and their scales [N] (fp32): the scheme an
    int8 bundle's converter config asks MindSpore Lite for, ``w ~ code * scale``."""
    q = quantize_blockwise(weight, BITS["int8"], weight.shape[1])
    codes = q.packed[:, 0, : weight.shape[1]]
    np.bitwise_xor(codes, zero_point(BITS["int8"]), out=codes)  # code - 128 in two's complement, in place
    return codes.view(np.int8), q.scales.reshape(-1)  # one block per row: its scale


def int4_fused_layout(packed: np.ndarray, scales: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits INT4 of ``W [N, K]`` (``packed [N, blocks, group/2]``, ``scales [N, blocks]``, groups dividing K) in
    the layout CANN documents for ``WeightQuantBatchMatmul``: the weight as ``[K, N]`` signed 4-bit values, two a byte
    along N (the low nibble first), and the scales as ``[blocks, N]``; ``w = value * scale``. A signed nibble is the
    unsigned code with its top bit flipped (``code - 8`` in two's complement)."""
    codes = unpack_nibbles(packed.reshape(packed.shape[0], -1))
    values = np.ascontiguousarray((codes[:, :k] ^ zero_point(4)).T)  # [K, N]
    return pack_nibbles(values), np.ascontiguousarray(scales.T)


def release(weight: np.ndarray) -> None:
    """Drop a converted tensor's memory-mapped pages from this process: the bundle's pages read while converting
    count in its resident set (1.9 GB at 2 full-width layers) until the map closes after loading, and they set the
    load's peak; the page cache keeps them. A plain array has nothing to drop."""
    mapped = getattr(weight, "_mmap", None)  # np.memmap's mapping
    if mapped is not None:
        mapped.madvise(mmap.MADV_DONTNEED)


def is_norm(name: str) -> bool:
    """A LayerNorm's weight or bias: kept in fp32 whatever the compute dtype, as the Ascend graphs keep them."""
    return name.rsplit(".", 1)[0].endswith((INPUT_NORM, POST_ATTENTION_NORM, FINAL_NORM))


def weights_format(bundle: Bundle, options: EngineOptions) -> str | None:
    """The format the matrices are held in: ``options.weights`` (int8 or int4, quantized at load), else an int8
    bundle's int8, else None (the compute dtype)."""
    return options.weights or ("int8" if bundle.manifest["quant"]["weights"] == "int8" else None)


def fused_matmul_available(device: str) -> bool:
    """MindSpore's fused antiquant matmul is used on an NPU when this MindSpore defines it (its kernels are Ascend
    only: on the CPU MindSpore refuses the op, ``Unsupported op [WeightQuantBatchMatmul] on CPU``)."""
    from mindspore.ops import auto_generate

    return device == "ascend" and hasattr(auto_generate, "WeightQuantBatchMatmul")


class ModelState:
    """What every graph shares: the weights, the rotary tables and the KV cache, as MindSpore Parameters in the
    ``compute`` dtype (LayerNorm parameters in fp32).

    With ``quant`` (int8 or int4) each matrix is held as codes with scales, a block of rows at a time (``blocks``: per
    matrix, (codes, scales) indices into ``weights`` and ``scales``): int8 per output row, a quarter of the fp32
    weight memory; int4 for the linear layers in groups of ``INT4_GROUP`` inputs (the MatMulNBits layout), an eighth
    plus a scale per group, the vocabulary table in int8. ``kinds`` says which. With ``fused`` (an NPU with
    ``WeightQuantBatchMatmul``) an int4 matrix is one block in that op's layout (``int4_fused_layout``)."""

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], capacity: int, quant: str | None = None,
                 compute: type = np.float32, fused: bool = False) -> None:
        ms = _mindspore()
        from mindspore import Parameter, ParameterTuple, Tensor

        self.config, self.capacity, self.fused = config, capacity, fused
        # one group size for every int4 matrix (the fused op takes it as an attribute): the export's, or the narrower
        # group a narrow model's hidden width allows; the wider inputs (4 x hidden) are multiples of it
        self.group = effective_group(config.hidden_size, INT4_GROUP)
        self.dtype = ms.float16 if compute == np.float16 else ms.float32
        names = [n for n in sorted(weights) if not (n == EMBEDDING and weights[n] is weights.get(LM_HEAD))]
        params, scales = [], []
        self.blocks: dict[str, tuple[tuple[int, int], ...]] = {}
        self.kinds: dict[str, str] = {}  # a quantized matrix's format: "int8" or "int4"

        def held(name: str, values: np.ndarray, scale: np.ndarray, dtype=None) -> tuple[int, int]:
            params.append(Parameter(Tensor(values, dtype), name=f"{name}.{len(params)}", requires_grad=False))
            scales.append(Parameter(Tensor(scale.astype(compute)), name=f"{name}.scales{len(scales)}",
                                    requires_grad=False))
            return len(params) - 1, len(scales) - 1

        for name in names:  # one tensor at a time: each copied out of its memory map, converted, handed to MindSpore
            weight = weights[name]
            n, k = weight.shape[0], weight.shape[-1]
            rows = max(1, WIDEN_ELEMENTS // k)
            if quant is None or weight.ndim == 1:
                dtype = np.float32 if is_norm(name) else compute
                params.append(Parameter(Tensor(np.array(weight, dtype)), name=name, requires_grad=False))
            elif quant == "int4" and name not in (EMBEDDING, LM_HEAD):
                self.kinds[name] = "int4"
                q = quantize_blockwise(weight, BITS["int4"], self.group)
                if fused:
                    packed, grouped = int4_fused_layout(q.packed, q.scales, k)
                    self.blocks[name] = (held(name, packed, grouped, ms.qint4x2),)
                else:
                    rows = max(1, rows // INT4_TEMPORARIES)
                    self.blocks[name] = tuple(held(name, q.packed[s:s + rows], q.scales[s:s + rows])
                                              for s in range(0, n, rows))
            else:
                self.kinds[name] = "int8"
                # a block at a time (the codes are per row): the table's codes are never held twice
                self.blocks[name] = tuple(held(name, *int8_codes(weight[s:s + rows])) for s in range(0, n, rows))
            release(weight)
        self.weights, self.scales = ParameterTuple(params), ParameterTuple(scales)
        self.index = {p.name: i for i, p in enumerate(params) if p.name in weights}
        for table in (self.index, self.blocks, self.kinds):  # a tied embedding is the lm_head table
            if EMBEDDING not in names and LM_HEAD in table:
                table[EMBEDDING] = table[LM_HEAD]
        self.widths = {name: weights[name].shape[1] for name in self.blocks}  # K: each block holds WIDEN_ELEMENTS // K rows
        cos, sin = rotary_half_table(np.arange(config.max_sequence_length + 1), config.rotary_dim)
        self.cos = Parameter(Tensor(cos.astype(compute)), name="rotary.cos", requires_grad=False)
        self.sin = Parameter(Tensor(sin.astype(compute)), name="rotary.sin", requires_grad=False)
        shape = (config.num_heads, capacity, config.head_dim)
        self.cache = ParameterTuple([Parameter(Tensor(np.zeros(shape, compute)), name=f"cache.{n}.{kind}",
                                               requires_grad=False)
                                     for n in range(config.num_layers) for kind in ("key", "value")])
        self.ms = ms


def graph_cell(state: ModelState, length: int):
    """A Cell computing ``length`` positions (a prefill gear, or 1 for decode) on ``state``; its ``construct(ids,
    positions, bias, slots, last)`` takes ids [1, L] int32, positions [1, 2, L] int32, bias [1, 1, L, capacity]
    fp32, slots [L] int32 (the cache slots the L positions write) and last [1] int32 (the row whose logits come
    out) -> logits [1, vocab]."""
    ms = state.ms
    from mindspore import Parameter, Tensor, jit_class, nn, ops

    config, capacity, dtype = state.config, state.capacity, state.dtype
    heads, head_dim = config.num_heads, config.head_dim

    @jit_class
    class Dequant:
        """``appliance.model.weights.DequantOps`` on MindSpore tensors in the compute dtype (a Cell cannot be one: its
        ``to_float`` is MindSpore's own)."""

        def to_float(self, x):
            return ops.cast(x, dtype)

        def add(self, a, b):
            return a + b

        def sub(self, a, b):
            return a - b

        def mul(self, a, b):
            """A broadcast operand widened first: MindSpore 2.10's CPU ``Mul`` broadcasting the scales over a block
            kept ~0.4 GB per 2^25-value block alive to the end of the graph (measured)."""
            if not isinstance(b, float) and b.shape != a.shape:
                b = ops.broadcast_to(b, a.shape)
            return a * b

        def div(self, a, b):
            """By the reciprocal (exact: ``dequantize`` divides by 16): MindSpore 2.10's CPU ``RealDiv`` by a scalar
            kept ~0.25 GB per 2^25-value block alive to the end of the graph (measured)."""
            return a * (1.0 / b)

        def floor(self, x):
            return ops.floor(x)

        def pair(self, a, b):
            return ops.stack((a, b), -1)

        def reshape(self, x, shape):
            return x.reshape(tuple(x.shape[i] if d == 0 else d for i, d in enumerate(shape)))

        def unsqueeze_last(self, x):
            return ops.expand_dims(x, -1)

        def slice_last(self, x, length):
            """Nothing to cut unless the last group is padding (a full-width ``StridedSlice`` copies the block, ~2 s
            per block on this CPU)."""
            return x if x.shape[-1] == length else x[..., :length]

    class MindSporeOps(nn.Cell):
        """The definition's ``Ops`` on MindSpore tensors in the state's compute dtype; LayerNorm, the attention scores
        from the bias on and the logits in fp32."""

        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.index, self.weights, self.cache = state.index, state.weights, state.cache
            self.scales, self.blocks, self.kinds, self.widths = state.scales, state.blocks, state.kinds, state.widths
            self.dequant = Dequant()
            if state.fused:  # x [M, K] @ W: int8 codes [rows, K] (transposed), int4 [K, N] in groups (the op's layout)
                from mindspore.ops.auto_generate import WeightQuantBatchMatmul

                self.antiquant8 = WeightQuantBatchMatmul(False, True, 0)
                self.antiquant4 = WeightQuantBatchMatmul(False, False, state.group)
            self.fused = state.fused
            self.cos, self.sin = state.cos, state.sin
            # the call's inputs, written by ``feed`` (see the module's docstring)
            self.positions = Parameter(Tensor(np.zeros((1, 2, length), np.int32)), name=f"in{length}.positions",
                                       requires_grad=False)
            self.bias = Parameter(Tensor(np.zeros((1, 1, length, capacity), np.float32)), name=f"in{length}.bias",
                                  requires_grad=False)
            self.slots = Parameter(Tensor(np.zeros((length,), np.int32)), name=f"in{length}.slots", requires_grad=False)
            self.last = Parameter(Tensor(np.zeros((1,), np.int32)), name=f"in{length}.last", requires_grad=False)
            self.heads_index = Tensor(np.repeat(np.arange(heads, dtype=np.int32), length).reshape(heads, length, 1))
            # python floats: no numpy values in the graph (see the module's docstring)
            self.score_scales = [tuple(float(s) for s in attention_scales(n, head_dim)) for n in range(config.num_layers)]
            self.matmul = ops.MatMul(transpose_b=True)  # reads W [out, in] as it is; W.T would be copied per call
            self.scores = ops.BatchMatMul(transpose_b=True)
            self.mix = ops.BatchMatMul()
            self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=config.layernorm_epsilon)

        def construct(self, ids):
            return forward(self, ids)

        def feed(self, positions: np.ndarray, bias: np.ndarray, slots: np.ndarray, last: np.ndarray) -> None:
            """The call's inputs into the Parameters ``construct`` reads (see the module's docstring)."""
            for parameter, value in ((self.positions, positions), (self.bias, bias), (self.slots, slots),
                                     (self.last, last)):
                parameter.set_data(Tensor(value))

        def w(self, name):
            return self.weights[self.index[name]]

        def embed(self, ids):
            if EMBEDDING not in self.kinds:
                return ops.gather(self.w(EMBEDDING), ids, 0)
            rows = ops.zeros(ids.shape + (config.hidden_size,), dtype)
            span = WIDEN_ELEMENTS // config.hidden_size
            for i, (codes, scales) in enumerate(self.blocks[EMBEDDING]):  # each id's row from the block holding it
                local = ops.clamp(ids - i * span, 0, span - 1)
                found = ops.cast(ops.gather(self.weights[codes], local, 0), dtype)
                found = found * ops.expand_dims(ops.gather(self.scales[scales], local, 0), -1)
                inside = ops.expand_dims(ops.logical_and(ids >= i * span, ids < (i + 1) * span), -1)
                rows = ops.select(ops.broadcast_to(inside, rows.shape), found, rows)
            return rows

        def product(self, name, x):
            """``x [M, K] @ W.T`` for the matrix ``name``. Quantized codes go to the fused antiquant matmul (NPU), or
            are widened here a block of rows at a time (int4 through ``dequantize``, the one nibble unpacking), each
            block, codes and scales both, waiting for the previous block's product: MindSpore's runtime runs an op
            as soon as its inputs are ready, so scales not held back were broadcast for every block at the graph's
            start and kept (measured: ~0.13 GB per 2^25-value block), and the memory pool reuses one block's
            temporaries only when the blocks run one after another."""
            if name not in self.kinds:
                return self.matmul(x, self.w(name))
            int4 = self.kinds[name] == "int4"
            if self.fused and int4:
                codes, scales = self.blocks[name][0]
                return self.antiquant4(x, self.weights[codes], self.scales[scales], None, None, None, None)
            parts, ready = [], x
            for codes, scales in self.blocks[name]:
                weight, scale = ops.depend(self.weights[codes], ready), ops.depend(self.scales[scales], ready)
                if self.fused:
                    ready = self.antiquant8(x, weight, scale, None, None, None, None)
                elif int4:
                    ready = self.matmul(x, dequantize(self.dequant, weight, scale, 4, self.widths[name], 1))
                else:
                    ready = self.matmul(x, ops.cast(weight, dtype)) * scale
                parts.append(ready)
            return ops.concat(parts, -1)

        def rotary_half(self, row):
            rows = self.positions[:, row, :]
            return ops.expand_dims(ops.gather(self.cos, rows, 0), 2), ops.expand_dims(ops.gather(self.sin, rows, 0), 2)

        def linear(self, name, x):
            shape = x.shape
            y = self.product(name + ".weight", x.reshape(-1, shape[-1])) + self.w(name + ".bias")
            return y.reshape(shape[:-1] + (-1,))

        def layer_norm(self, name, x):
            """Statistics in fp32 (an fp16 variance of a 4096-wide row can overflow), the result in the compute dtype."""
            normed = self.norm(ops.cast(x, ms.float32), self.w(name + ".weight"), self.w(name + ".bias"))[0]
            return ops.cast(normed, dtype)

        def split_heads(self, x, parts):
            shape = x.shape
            return ops.split(x.reshape(shape[:-1] + (heads, parts * head_dim)), head_dim, -1)

        def split(self, x, parts):
            return ops.split(x, x.shape[-1] // parts, -1)

        def concat(self, xs):
            return ops.concat(xs, -1)

        def add(self, a, b):
            return a + b

        def mul(self, a, b):
            if isinstance(b, np.ndarray):  # the definition's rotary signs, as a list (no numpy value in the graph)
                b = Tensor(b.tolist(), dtype)
            return a * b

        def tanh(self, x):
            """From exp: MindSpore 2.10's CPU Tanh kernel approximates (logits 1.6e-4 off the numpy reference on the
            fixture, past the fp32 threshold 1e-4; from exp 1e-5, as onnxruntime). Saturates to +-1 (exp -> inf, 0)."""
            return 1.0 - 2.0 / (ops.exp(2.0 * x) + 1.0)

        def gelu(self, x):
            return tanh_gelu(self, x)

        def attention(self, layer, q, k, v):
            """THUDM's scaling (q divided, the biased scores multiplied back); the call's K/V written into the cache at
            its slots, then attention over the whole capacity under the bias (unwritten slots are hidden by it)."""
            divisor, coeff = self.score_scales[layer]
            where = ops.concat((self.heads_index, ops.broadcast_to(self.slots.reshape(1, -1, 1), (heads, -1, 1))), -1)
            keys, values = self.cache[2 * layer], self.cache[2 * layer + 1]
            keys = ops.scatter_nd_update(keys, where, k[0].transpose(1, 0, 2))
            values = ops.scatter_nd_update(values, where, v[0].transpose(1, 0, 2))
            q = q[0].transpose(1, 0, 2) / divisor  # [heads, L, head_dim]
            probs = ops.softmax((ops.cast(self.scores(q, keys), ms.float32) + self.bias[0]) * coeff, -1)
            return self.mix(ops.cast(probs, dtype), values).transpose(1, 0, 2).reshape(1, length, -1)

        def output_rows(self, x):
            return ops.gather(x, self.last, 1).squeeze(1)

        def lm_head(self, x):
            return ops.cast(self.product(LM_HEAD, x), ms.float32)

    return MindSporeOps()


class MindSporeRunner:
    """A ``GraphRunner`` over the Cells: turns the static graphs' inputs into the Cells' (bias widened to the capacity,
    one-hot write slot and last position into indices) and counts the bytes each call moves across the host."""

    def __init__(self, state: ModelState, graphs: list[str]) -> None:
        self.state, self.graphs, self.cells = state, set(graphs), {}
        self.host_bytes = 0  # of the last call: its inputs and the logits

    def reset(self) -> None:
        """Nothing to clear: a prefill writes its slots and the bias hides every slot a sequence has not written."""

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        from mindspore import Tensor

        if graph not in self.graphs:
            raise EngineError(f"this bundle has no {graph} graph")
        capacity = self.state.capacity
        bias = inputs["attention_bias"]
        if graph == "decode":
            slots = np.array([int(np.argmax(inputs["write_slot"][0, 0, :, 0]))], np.int32)
            last = np.zeros(1, np.int32)
        else:
            gear = bias.shape[-1]
            slots = np.arange(gear, dtype=np.int32)
            last = np.array([int(np.argmax(inputs["last_position"][0, :, 0]))], np.int32)
            bias = np.pad(bias, [(0, 0)] * 3 + [(0, capacity - gear)], constant_values=MASK_FILL)
        args = [inputs["input_ids"].astype(np.int32), inputs["position_ids"].astype(np.int32),
                np.ascontiguousarray(bias, np.float32), slots, last]
        cell = self.cells.get(graph) or self.cells.setdefault(graph, graph_cell(self.state, len(slots)))
        cell.feed(*args[1:])
        logits = cell(Tensor(args[0])).asnumpy()
        self.host_bytes = sum(a.nbytes for a in args) + logits.nbytes
        return logits


def open_on_mindspore(bundle: Bundle, options: EngineOptions) -> StaticEngine:
    """An Ascend bundle's weights on MindSpore, one Cell per graph, compiled on first use, on ``options.device`` (fp32
    on the CPU, fp16 on an NPU) in the format ``weights_format`` gives. MindSpore takes its CPU kernel thread count once per
    process: the first engine opened sets it (``threads``, else the physical cores)."""
    from appliance.engines.cpu import physical_cores

    device = options.device
    select_device(device, options.device_id)
    from mindspore.device_context.cpu import op_tuning

    with contextlib.suppress(RuntimeError):  # "The 'threads_num' can not be set repeatedly"
        op_tuning.threads_num(options.threads or physical_cores())
    state = ModelState(bundle.config, read_weights(bundle), int(bundle.manifest["graphs"]["capacity"]),
                       weights_format(bundle, options), DEVICES[device][1], fused_matmul_available(device))
    return static_engine(bundle, "mindspore", MindSporeRunner(state, list(bundle.manifest["graphs"]["device"])))
