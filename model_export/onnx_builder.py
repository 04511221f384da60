"""Build ONNX graphs op by op, streaming large initializers straight to an external data file.

Each weight is written when it is produced, so the graph never holds gigabytes in protobuf and the exporter holds one
tensor at a time. Large tensors start on 64 KiB boundaries so a runtime may memory-map them.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MMAP_ALIGN = 65536
SMALL_ALIGN = 64
WRITE_ROWS = 8192


class ExternalData:
    """Appends arrays to one data file and returns TensorProtos that reference them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = path.open("wb")
        self.offset = 0
        self.written: dict[str, TensorProto] = {}  # graphs sharing this file reuse a tensor written once

    def add(self, name: str, array: np.ndarray, dtype: type | None = None) -> TensorProto:
        """Write ``array`` (converted to ``dtype`` a chunk of rows at a time; it may be a memory map)."""
        if name in self.written:
            return self.written[name]
        dtype = np.dtype(dtype or array.dtype)
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
        align = MMAP_ALIGN if nbytes >= MMAP_ALIGN else SMALL_ALIGN
        pad = -self.offset % align
        self.file.write(b"\0" * pad)
        self.offset += pad
        start = self.offset
        rows = np.asarray(array).reshape(1, -1) if array.ndim < 2 else array
        for r in range(0, rows.shape[0], WRITE_ROWS):
            self.file.write(np.ascontiguousarray(rows[r:r + WRITE_ROWS], dtype=dtype).tobytes())
        self.offset += nbytes
        tensor = TensorProto(name=name, dims=list(array.shape),
                             data_type=helper.np_dtype_to_tensor_dtype(dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.written[name] = tensor
        return tensor

    def close(self) -> None:
        self.file.flush()
        self.file.close()


class GraphBuilder:
    """Accumulates nodes and initializers; ``op`` returns the output name(s) so code reads like the math."""

    def __init__(self, data: ExternalData | None = None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data = data
        self._ids = itertools.count()
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
           name: str | None = None, **attrs) -> str | list[str]:
        names = outputs if isinstance(outputs, list) else [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name or self.fresh(op_type), domain=domain,
                                           **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        """A small inline constant (shapes, axes, scalars), shared by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def reuse(self, name: str) -> str:
        """An initializer another graph already wrote to the shared data file."""
        if all(t.name != name for t in self.initializers):
            self.initializers.append(self.data.written[name])
        return name

    def weight(self, name: str, array: np.ndarray, dtype: type | None = None) -> str:
        """A named initializer, external when the builder has a data file."""
        if self.data is None:
            self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype or array.dtype), name))
        else:
            self.initializers.append(self.data.add(name, array, dtype))
        return name

    def branch(self) -> GraphBuilder:
        """A builder for an ``If`` branch or ``Loop`` body: its own nodes; names, constants and weights stay in the
        outer graph (a subgraph may read outer values by name)."""
        sub = GraphBuilder(self.data)
        sub.initializers, sub._ids, sub._consts = self.initializers, self._ids, self._consts
        return sub

    def subgraph(self, name: str, outputs: list[tuple], inputs: list[tuple] = ()) -> onnx.GraphProto:
        """This branch's nodes as a graph; ``inputs``/``outputs`` are (name, element type[, shape]) tuples."""
        def info(name: str, elem_type: int, shape: list | None = None) -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(name, elem_type, shape)

        return helper.make_graph(self.nodes, name, [info(*i) for i in inputs], [info(*o) for o in outputs])

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], opset: int,
              contrib: bool, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "chatglm6b_decoder", inputs, outputs, self.initializers, doc_string=doc)
        opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
        model = helper.make_model(graph, opset_imports=opsets, producer_name="streamchat")
        model.ir_version = min(model.ir_version, 9)
        return model
