"""An Ascend bundle's model on MindSpore itself: ``appliance.model.definition`` as MindSpore Cells in GRAPH_MODE.

The same Python runs on the CPU here and on an Ascend NPU where CANN is installed, so this engine checks the Ascend
path's model code on any machine. What it keeps on the device, loaded once:
- the weights, read from the bundle's device graphs' external data (``weights.onnx.data``, names as the checkpoint's;
  fp16 bundles' weights are widened to fp32 for CPU compute), as Parameters shared by every compiled graph;
- the KV cache, one Parameter per layer and kind, ``[heads, capacity, head_dim]``, written in place by each call
  (``ScatterNdUpdate`` at the call's slots) and read where it lies: no cache crosses the host.

One Cell per graph of the bundle (``prefill:<gear>`` and ``decode``), each compiled once for its shapes. They run the
StaticSequence's inputs (``appliance.engines.static``): the prompt right-padded to its gear under an additive
prefix-LM bias, a one-token step at a write slot. Per call only ids, positions, the bias row(s), the write slots and
the last-row index go in and logits come out.

MindSpore's graph compiler cannot hand tensors to a per-call ``Ops`` object (``jit_class`` instances take constants
only; attributes set in ``construct`` are not seen by the methods it calls), so each Cell copies its call's inputs
into small Parameters of its own (``inputs``) first, and the ``Ops`` methods read them there.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from appliance.engines import EngineOptions
from appliance.engines.static import StaticEngine, static_engine
from appliance.errors import BundleError, EngineError
from appliance.model.definition import MASK_FILL, attention_scales, forward, rotary_half_table, tanh_gelu
from appliance.model.weights import EMBEDDING, LM_HEAD
from appliance.model_config import ModelConfig

if TYPE_CHECKING:
    from appliance.bundle import Bundle

ROTARY_TABLES = ("rotary.cos", "rotary.sin")  # the graphs' own position tables: computed here from the definition
STORED = {1: np.float32, 10: np.float16}  # ONNX TensorProto data types the Ascend graphs store weights in


def read_weights(bundle: Bundle) -> dict[str, np.ndarray]:
    """The model's tensors (fp32) from the decode device graph's external data, by checkpoint name."""
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
        data = np.fromfile(bundle.path / entry["location"], dtype=dtype, count=count, offset=int(entry.get("offset", 0)))
        weights[tensor.name] = data.reshape(list(tensor.dims)).astype(np.float32)
    if EMBEDDING not in weights and LM_HEAD in weights:
        weights[EMBEDDING] = weights[LM_HEAD]  # tied: the graphs store the table once, as lm_head
    return weights


def _mindspore():
    """MindSpore, set to compile graphs on the CPU (the only device this engine is verified on)."""
    try:
        import mindspore
    except ImportError as exc:
        raise EngineError(f"the mindspore engine needs MindSpore: pip install 'streamchat[mindspore]' ({exc})") from None
    mindspore.set_context(mode=mindspore.GRAPH_MODE)
    mindspore.set_device("CPU")
    return mindspore


class ModelState:
    """What every graph shares: the weights, the rotary tables and the KV cache, as MindSpore Parameters."""

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], capacity: int) -> None:
        ms = _mindspore()
        from mindspore import Parameter, ParameterTuple, Tensor

        self.config, self.capacity = config, capacity
        names = sorted(weights)
        self.index = {name: i for i, name in enumerate(names)}
        self.weights = ParameterTuple([Parameter(Tensor(weights[n]), name=n, requires_grad=False) for n in names])
        cos, sin = rotary_half_table(np.arange(config.max_sequence_length + 1), config.rotary_dim)
        self.cos = Parameter(Tensor(cos), name="rotary.cos", requires_grad=False)
        self.sin = Parameter(Tensor(sin), name="rotary.sin", requires_grad=False)
        shape = (config.num_heads, capacity, config.head_dim)
        self.cache = ParameterTuple([Parameter(Tensor(np.zeros(shape, np.float32)), name=f"cache.{n}.{kind}",
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

    config, capacity = state.config, state.capacity
    heads, head_dim = config.num_heads, config.head_dim

    class MindSporeOps(nn.Cell):
        """The definition's ``Ops`` on MindSpore tensors (fp32)."""

        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.index, self.weights, self.cache = state.index, state.weights, state.cache
            self.cos, self.sin = state.cos, state.sin
            # the call's inputs, copied in by construct (see the module's docstring)
            self.positions = Parameter(Tensor(np.zeros((1, 2, length), np.int32)), name=f"in{length}.positions",
                                       requires_grad=False)
            self.bias = Parameter(Tensor(np.zeros((1, 1, length, capacity), np.float32)), name=f"in{length}.bias",
                                  requires_grad=False)
            self.slots = Parameter(Tensor(np.zeros((length,), np.int32)), name=f"in{length}.slots", requires_grad=False)
            self.last = Parameter(Tensor(np.zeros((1,), np.int32)), name=f"in{length}.last", requires_grad=False)
            self.heads_index = Tensor(np.repeat(np.arange(heads, dtype=np.int32), length).reshape(heads, length, 1))
            # python floats: the graph holds no numpy values (MindSpore 2.10 is built against numpy 1.x)
            self.scales = [tuple(float(s) for s in attention_scales(n, head_dim)) for n in range(config.num_layers)]
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
            return ops.gather(self.w(EMBEDDING), ids, 0)

        def rotary_half(self, row):
            rows = self.positions[:, row, :]
            return ops.expand_dims(ops.gather(self.cos, rows, 0), 2), ops.expand_dims(ops.gather(self.sin, rows, 0), 2)

        def linear(self, name, x):
            shape = x.shape
            y = self.matmul(x.reshape(-1, shape[-1]), self.w(name + ".weight")) + self.w(name + ".bias")
            return y.reshape(shape[:-1] + (-1,))

        def layer_norm(self, name, x):
            return self.norm(x, self.w(name + ".weight"), self.w(name + ".bias"))[0]

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
            if isinstance(b, np.ndarray):
                b = Tensor(b.tolist(), ms.float32)
            return a * b

        def tanh(self, x):
            return ops.tanh(x)

        def gelu(self, x):
            return tanh_gelu(self, x)

        def attention(self, layer, q, k, v):
            """THUDM's scaling (q divided, the biased scores multiplied back); the call's K/V written into the cache at
            its slots, then attention over the whole capacity under the bias (unwritten slots are hidden by it)."""
            divisor, coeff = self.scales[layer]
            where = ops.concat((self.heads_index, ops.broadcast_to(self.slots.reshape(1, -1, 1), (heads, -1, 1))), -1)
            keys, values = self.cache[2 * layer], self.cache[2 * layer + 1]
            keys = ops.scatter_nd_update(keys, where, k[0].transpose(1, 0, 2))
            values = ops.scatter_nd_update(values, where, v[0].transpose(1, 0, 2))
            q = q[0].transpose(1, 0, 2) / divisor  # [heads, L, head_dim]
            probs = ops.softmax((self.scores(q, keys) + self.bias[0]) * coeff, -1)
            return self.mix(probs, values).transpose(1, 0, 2).reshape(1, length, -1)

        def output_rows(self, x):
            return ops.gather(x, self.last, 1)[:, 0]

        def lm_head(self, x):
            return self.matmul(x, self.w(LM_HEAD))

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
    """An Ascend bundle's weights on MindSpore (CPU), one Cell per graph, compiled on first use."""
    ms = _mindspore()
    if options.threads:
        ms.set_context(runtime_num_threads=options.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        from appliance.engines.cpu import physical_cores

        ms.set_context(runtime_num_threads=physical_cores())
    state = ModelState(bundle.config, read_weights(bundle), int(bundle.manifest["graphs"]["capacity"]))
    return static_engine(bundle, "mindspore", MindSporeRunner(state, list(bundle.manifest["graphs"]["device"])))
