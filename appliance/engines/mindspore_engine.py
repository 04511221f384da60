"""An Ascend bundle's model on MindSpore itself: ``appliance.model.definition`` as MindSpore Cells in GRAPH_MODE.

The same Python runs on the CPU here and on an Ascend NPU where CANN is installed, so this engine checks the Ascend
path's model code on any machine. What it keeps on the device, loaded once:
- the weights, read from the bundle's device graphs' external data (``weights.onnx.data``, names as the checkpoint's;
  on the CPU (``STREAMCHAT_MS_DEVICE=cpu``) computed in fp32, fp16 weights widened; on an Ascend NPU (``ascend``) in
  fp16 with LayerNorm, softmax and logits in fp32; an int8 bundle's become per-output-channel int8 codes, as its
  converter config asks of MindSpore Lite), as Parameters shared by every compiled graph;
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
import os
from typing import TYPE_CHECKING

import numpy as np

from appliance.engines import EngineOptions
from appliance.engines.static import StaticEngine, static_engine
from appliance.errors import BundleError, EngineError
from appliance.folders import cache_dir
from appliance.model.definition import MASK_FILL, attention_scales, forward, rotary_half_table, tanh_gelu
from appliance.model.quantize import BITS, quantize_blockwise
from appliance.model.weights import (
    EMBEDDING,
    FINAL_NORM,
    INPUT_NORM,
    LM_HEAD,
    POST_ATTENTION_NORM,
    expected_shapes,
    zero_point,
)
from appliance.model_config import ModelConfig

if TYPE_CHECKING:
    from appliance.bundle import Bundle

ROTARY_TABLES = ("rotary.cos", "rotary.sin")  # the graphs' own position tables: computed here from the definition
STORED = {1: np.float32, 10: np.float16}  # ONNX TensorProto data types the Ascend graphs store weights in
WIDEN_ROWS = 8192  # int8 weight rows widened at a time: 128 MiB in fp32 at ChatGLM-6B's width 4096
# STREAMCHAT_MS_DEVICE -> (MindSpore's device target, the compute dtype): fp16 on the NPU as the Ascend graphs compute,
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


def device_choice() -> tuple[str, int]:
    """The device this engine runs on, ``STREAMCHAT_MS_DEVICE`` (cpu, the default, or ascend), and the NPU number,
    ``STREAMCHAT_MS_DEVICE_ID`` (default 0), as the mindspore-lite engine takes them."""
    device, device_id = os.environ.get("STREAMCHAT_MS_DEVICE", "cpu"), os.environ.get("STREAMCHAT_MS_DEVICE_ID", "0")
    if device not in DEVICES:
        raise EngineError(f"MindSpore device {device[:20]!r} is not one of {', '.join(DEVICES)} (STREAMCHAT_MS_DEVICE)")
    if not device_id.isdigit():
        raise EngineError(f"STREAMCHAT_MS_DEVICE_ID must be an NPU number such as 0, not {device_id[:20]!r}")
    return device, int(device_id)


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
        raise EngineError(f"{what} (MindSpore {ms.__version__}, STREAMCHAT_MS_DEVICE={device}, card {device_id}): "
                          f"{first[:160]}") from None
    return ms


def int8_codes(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel 8-bit codes of ``weight [N, K]`` (int8) and their scales [N] (fp32): the scheme an
    int8 bundle's converter config asks MindSpore Lite for, ``w ~ code * scale``."""
    q = quantize_blockwise(weight, BITS["int8"], weight.shape[1])
    codes = q.packed[:, 0, : weight.shape[1]].astype(np.int16) - zero_point(BITS["int8"])
    return codes.astype(np.int8), q.scales.reshape(-1)  # one block per row: its scale


def is_norm(name: str) -> bool:
    """A LayerNorm's weight or bias: kept in fp32 whatever the compute dtype, as the Ascend graphs keep them."""
    return name.rsplit(".", 1)[0].endswith((INPUT_NORM, POST_ATTENTION_NORM, FINAL_NORM))


class ModelState:
    """What every graph shares: the weights, the rotary tables and the KV cache, as MindSpore Parameters in the
    ``compute`` dtype (LayerNorm parameters in fp32). With ``int8`` the matrices (linear layers and the vocabulary
    table) are held as int8 codes with per-row scales and widened inside the graph one matrix at a time, right before
    their product (the graph's memory plan reuses that temporary): a quarter of the fp32 weight memory, plus the
    largest matrix in the compute dtype while it is multiplied."""

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], capacity: int, int8: bool = False,
                 compute: type = np.float32) -> None:
        ms = _mindspore()
        from mindspore import Parameter, ParameterTuple, Tensor

        self.config, self.capacity = config, capacity
        self.dtype = ms.float16 if compute == np.float16 else ms.float32
        names = [n for n in sorted(weights) if not (n == EMBEDDING and weights[n] is weights.get(LM_HEAD))]
        params, scales, self.scale_index = [], [], {}
        self.blocks: dict[str, tuple[int, ...]] = {}  # an int8 matrix's row blocks, by their index in ``weights``
        for name in names:  # one tensor at a time: each copied out of its memory map, converted, handed to MindSpore
            if int8 and weights[name].ndim == 2:
                codes, row_scales = int8_codes(weights[name])
                self.scale_index[name] = len(scales)
                scales.append(Parameter(Tensor(row_scales.astype(compute)), name=name + ".scales",
                                        requires_grad=False))
                self.blocks[name] = tuple(range(len(params), len(params) + -(-len(codes) // WIDEN_ROWS)))
                params += [Parameter(Tensor(codes[start:start + WIDEN_ROWS]), name=f"{name}.rows{start}",
                                     requires_grad=False) for start in range(0, len(codes), WIDEN_ROWS)]
            else:
                dtype = np.float32 if is_norm(name) else compute
                params.append(Parameter(Tensor(np.array(weights[name], dtype)), name=name, requires_grad=False))
        self.weights, self.scales = ParameterTuple(params), ParameterTuple(scales)
        self.index = {name: i for i, name in enumerate(p.name for p in params)}
        for table in (self.index, self.scale_index, self.blocks):  # a tied embedding is the lm_head table
            if EMBEDDING not in names and LM_HEAD in table:
                table[EMBEDDING] = table[LM_HEAD]
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
    from mindspore import Parameter, Tensor, nn, ops

    config, capacity, dtype = state.config, state.capacity, state.dtype
    heads, head_dim = config.num_heads, config.head_dim

    class MindSporeOps(nn.Cell):
        """The definition's ``Ops`` on MindSpore tensors in the state's compute dtype; LayerNorm, the attention scores
        from the bias on and the logits in fp32."""

        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.index, self.weights, self.cache = state.index, state.weights, state.cache
            self.scale_index, self.scales, self.blocks = state.scale_index, state.scales, state.blocks
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
            if EMBEDDING not in self.scale_index:
                return ops.gather(self.w(EMBEDDING), ids, 0)
            rows = ops.zeros(ids.shape + (config.hidden_size,), dtype)
            for i, block in enumerate(self.blocks[EMBEDDING]):  # each id's row from the block holding it
                local = ids - i * WIDEN_ROWS
                found = ops.gather(self.weights[block], ops.clamp(local, 0, WIDEN_ROWS - 1), 0)
                inside = ops.expand_dims(ops.logical_and(local >= 0, local < WIDEN_ROWS), -1)
                rows = ops.select(ops.broadcast_to(inside, rows.shape), ops.cast(found, dtype), rows)
            return rows * ops.expand_dims(ops.gather(self.scales[self.scale_index[EMBEDDING]], ids, 0), -1)

        def product(self, name, x):
            """``x [M, K] @ W.T`` for the matrix ``name``. int8 codes are widened here, WIDEN_ROWS rows at a time, each
            block waiting for the previous block's product: the graph cannot widen every matrix up front, and its
            memory plan reuses one block-sized fp32 temporary."""
            if name not in self.scale_index:
                return self.matmul(x, self.w(name))
            parts, ready = [], x
            for block in self.blocks[name]:
                ready = self.matmul(x, ops.cast(ops.depend(self.weights[block], ready), dtype))
                parts.append(ready)
            return ops.concat(parts, -1) * self.scales[self.scale_index[name]]

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
    """An Ascend bundle's weights on MindSpore, one Cell per graph, compiled on first use, on the device
    ``device_choice`` names (fp32 on the CPU, fp16 on an NPU). MindSpore takes its CPU kernel thread count once per
    process: the first engine opened sets it (``threads``, else the physical cores)."""
    from appliance.engines.cpu import physical_cores

    device, device_id = device_choice()
    select_device(device, device_id)
    from mindspore.device_context.cpu import op_tuning

    with contextlib.suppress(RuntimeError):  # "The 'threads_num' can not be set repeatedly"
        op_tuning.threads_num(options.threads or physical_cores())
    state = ModelState(bundle.config, read_weights(bundle), int(bundle.manifest["graphs"]["capacity"]),
                       int8=bundle.manifest["quant"]["weights"] == "int8", compute=DEVICES[device][1])
    return static_engine(bundle, "mindspore", MindSporeRunner(state, list(bundle.manifest["graphs"]["device"])))
