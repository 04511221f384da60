"""Prompts of INT4 ``cpu`` bundles on the C prompt kernels: every row into the engine's KV cache, and the last row's
logits.

Why: a prompt is arithmetic-bound; ``appliance/kernels/prompt_kernels.c`` multiplies prompts on the same weights
faster than onnxruntime's INT4 kernel, with AVX2 or AVX-512 VNNI as the CPU has them (docs/performance.md).

How: the layers are ``appliance.model.definition``'s, run here in numpy around the kernels (the linear layers,
LayerNorm and GELU) on the same MatMulNBits codes and scales the graph holds, read from the bundle's data file through a
memory map whose pages are dropped after each matmul (the weights then live in the page cache, not in this process:
peak RSS grows by at most one matrix). Keys and values go straight into the engine's KV cache; attention follows the
prompt's own mask, so any prefix-LM layout is exact. The last row's logits come from the final LayerNorm and the
quantized lm_head (4 or 8 bits) in the kernels' fp32 GEMV, a single pass over the table. Bundles with an unquantized
lm_head, and prompts shorter than ``MIN_PROMPT`` (where the graph's single pass over the weights wins), prefill in the
graph.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import ThreadpoolController

from appliance.errors import EngineError
from appliance.kernels.prompt_kernels import Int4Weight, PromptKernels, groups_fit, load, split
from appliance.model.definition import MASK_FILL, attention_inputs, attention_output, net_attention_scale, rotary_tables
from appliance.model.numpy_ops import ARRAY, NumpyOps
from appliance.model.weights import EMBEDDING, FINAL_NORM, INPUT_NORM, LINEARS, dequantize, layer_prefix
from appliance.model_config import ModelConfig

if TYPE_CHECKING:
    import onnx

MIN_PROMPT = 16  # below this the graph's single pass over the weights wins (measured: docs/performance.md)
HEAD = "lm_head"
HEAD_ROWS = 8192  # lm_head rows mapped at a time: 32 MB of an INT8 table
QUERY_CHUNK = 128  # prompt rows per attention chunk: scores of [HEAD_GROUP, 128, length] at a time
HEAD_GROUP = 4  # heads whose keys and values are widened to fp32 together: 8 MB per thread at 2048 tokens
ROWS = 256  # prompt rows per chunk of the linear layers: the 4h activations of 256 rows are 16 MB


class BundleTensors:
    """The graph's initializers by name: inline ones decoded, external ones viewed in a read-only memory map."""

    def __init__(self, graph: Path, model: onnx.ModelProto) -> None:
        import onnx
        from onnx import numpy_helper

        self.inline, self.external, locations = {}, {}, set()
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {entry.key: entry.value for entry in tensor.external_data}
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                self.external[tensor.name] = (int(info.get("offset", 0)), tuple(tensor.dims), dtype)
                locations.add(info["location"])
            else:
                self.inline[tensor.name] = numpy_helper.to_array(tensor)
        if len(locations) > 1:
            raise EngineError(f"{graph.name} spreads its weights over {len(locations)} files; expected one")
        self.map = None
        self.spans: dict[str, list[list[int]]] = {}  # release(prefix)'s byte ranges, merged, by prefix
        # True where this map is the process's only copy of the weights and every decode step reads them again
        # (bench/decode_step.py): dropping the pages would fault them back in from the page cache each step
        self.keep_pages = False
        if locations:
            with open(graph.parent / locations.pop(), "rb") as data:
                self.map = mmap.mmap(data.fileno(), 0, access=mmap.ACCESS_READ)

    def __contains__(self, name: str) -> bool:
        return name in self.inline or name in self.external

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.inline:
            return self.inline[name]
        offset, shape, dtype = self.external[name]
        return np.frombuffer(self.map, dtype, int(np.prod(shape, dtype=np.int64)), offset).reshape(shape)

    def release(self, prefix: str = "") -> None:
        """Drop the mapped pages of the tensors named ``prefix...`` (all by default) from this process: they stay in
        the page cache, and a later read maps them again."""
        if not prefix:
            self._drop(0, len(self.map) if self.map is not None else 0)
            return
        if prefix not in self.spans:  # a linear layer's codes, scales and bias lie side by side: usually one span
            spans: list[list[int]] = []
            for offset, end in sorted((offset, offset + self._nbytes(name)) for name, (offset, _, _)
                                      in self.external.items() if name.startswith(prefix)):
                if spans and offset <= spans[-1][1] + mmap.PAGESIZE:
                    spans[-1][1] = max(spans[-1][1], end)
                else:
                    spans.append([offset, end])
            self.spans[prefix] = spans
        for start, end in self.spans[prefix]:
            self._drop(start, end)

    def release_rows(self, name: str, rows: slice) -> None:
        """Drop the mapped pages of rows ``rows`` of the tensor ``name`` (along its first axis)."""
        offset, shape, _ = self.external[name]
        row_bytes = self._nbytes(name) // shape[0]
        self._drop(offset + rows.start * row_bytes, offset + rows.stop * row_bytes)

    def _nbytes(self, name: str) -> int:
        _, shape, dtype = self.external[name]
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize

    def _drop(self, start: int, end: int) -> None:
        """MADV_DONTNEED on the pages holding bytes start..end of the data file (the map's unmodified pages: the kernel
        reads them from the file again on the next touch), unless the pages are kept."""
        if self.keep_pages or self.map is None or not hasattr(mmap, "MADV_DONTNEED") or end <= start:
            return
        start -= start % mmap.PAGESIZE
        self.map.madvise(mmap.MADV_DONTNEED, start, end - start)


def _int4_weight(tensors: BundleTensors, prefix: str) -> Int4Weight:
    return Int4Weight(tensors[prefix + ".qweight"], tensors[prefix + ".scales"], tensors[prefix + ".bias"])


def _linear_attributes(model: onnx.ModelProto) -> dict[str, dict]:
    """MatMulNBits attributes by weight initializer name."""
    import onnx

    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            found[node.input[1]] = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return found


class Int4Prefill:
    """Fills an engine's KV cache with a prompt's keys and values and returns its last row's logits (see the module's
    doc)."""

    def __init__(self, config: ModelConfig, tensors: BundleTensors, kernels: PromptKernels, head_bits: int) -> None:
        self.config, self.tensors, self.kernels, self.head_bits = config, tensors, kernels, head_bits

    @classmethod
    def open(cls, graph: Path, config: ModelConfig, threads: int) -> Int4Prefill | None:
        """The prompt path for this graph, or None where it does not apply: no kernel on this machine, layers that are
        not INT4 with int8 activations (accuracy level 4) in shapes the kernel takes, or an lm_head that is not a
        4- or 8-bit MatMulNBits matrix."""
        lib = load()
        if lib is None:
            return None
        import onnx  # only here: the rest of the runtime core does not need it

        model = onnx.load(str(graph), load_external_data=False)
        attributes = _linear_attributes(model)
        tensors = BundleTensors(graph, model)
        kernels = PromptKernels(lib, threads)
        for n in range(config.num_layers):
            for linear in LINEARS:
                prefix = layer_prefix(n) + linear
                attrs = attributes.get(prefix + ".qweight")
                if attrs is None or attrs.get("bits") != 4 or attrs.get("accuracy_level") != 4:
                    return None
                weight = _int4_weight(tensors, prefix)
                # no padded groups, shapes the kernel takes
                if weight.k != attrs["K"] or not weight.supported(kernels.columns_per_panel):
                    return None
        head = attributes.get(HEAD + ".qweight", {})
        if (head.get("bits") not in (4, 8) or head.get("K") != config.hidden_size
                or not groups_fit(head["K"], head.get("block_size", 0))):
            return None
        table = tensors[HEAD + ".qweight"]  # [vocab, blocks, group * bits / 8], as the attributes describe it
        if table.ndim != 3 or table.shape[1] * table.shape[2] * 8 != head["K"] * head["bits"]:
            return None
        return cls(config, tensors, kernels, int(head["bits"]))

    @staticmethod
    def takes(ids: np.ndarray) -> bool:
        """Whether this prompt is long enough to be worth it (see the module's doc)."""
        return len(ids) >= MIN_PROMPT

    def run(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray, cache: list[np.ndarray]) -> np.ndarray:
        """ids [L], position_ids [2, L], mask [L, L] (True = masked); cache: the engine's buffers
        ``[1, heads, capacity, head_dim]`` in the graph's order (key, value per layer) -> the last row's logits."""
        ops = _KernelOps(self, position_ids)
        rope = rotary_tables(ops)  # [L, 1, head_dim] each
        x = ops.embed(ids)  # the residual stream, updated in place layer after layer
        last = self.config.num_layers - 1
        try:
            with PROMPT_SCOPE:
                for n in range(self.config.num_layers):
                    # the last layer's outputs feed only the last row's logits: after its keys and values, one row
                    rows_out = slice(len(ids) - 1, len(ids)) if n == last else slice(0, len(ids))
                    self._layer(ops, n, x, rope, mask, cache[2 * n], cache[2 * n + 1], rows_out)
                return ops.lm_head(ops.layer_norm(FINAL_NORM, x[-1]))
        finally:
            self.tensors.release()

    def _layer(self, ops: _KernelOps, n: int, x: np.ndarray, rope: tuple[np.ndarray, np.ndarray], mask: np.ndarray,
               key_cache: np.ndarray, value_cache: np.ndarray, rows_out: slice) -> None:
        """One block on the residual stream ``x`` [L, hidden], in place: the definition's two row-local halves ROWS rows
        at a time around this module's attention. Every row's keys and values go into the cache; the attention and the
        second half run for ``rows_out`` only (the rest of ``x`` is then left as it was). Besides ``x`` a layer holds
        one [L, hidden] buffer (the queries, then the attention's context written over them) and per-chunk
        temporaries; the second half computes the input LayerNorm again for every chunk but the last one's rows rather
        than keeping it (a long prompt's peak memory is these buffers)."""
        cfg, p = self.config, layer_prefix(n)
        length = len(x)
        queries = np.empty((length, cfg.num_heads, cfg.head_dim), np.float32)
        chunks = _chunks(length, ROWS)
        for rows in chunks:
            ln1, q, k, v = attention_inputs(ops, n, x[rows], (rope[0][rows], rope[1][rows]))  # [rows, heads, hd]
            np.multiply(q, np.float32(net_attention_scale(cfg.head_dim)), out=queries[rows])
            self.kernels.store_heads(k, key_cache[0, :, rows])
            self.kernels.store_heads(v, value_cache[0, :, rows])
        asked = queries[rows_out]
        context = self._attention(asked, key_cache, value_cache, mask[rows_out], length).reshape(len(asked), -1)
        for rows in _chunks(len(asked), ROWS, rows_out.start):
            # ln1 is the last chunk's: x[chunks[-1]] is written last
            normed = ln1 if rows == chunks[-1] else ops.layer_norm(p + INPUT_NORM, x[rows])
            x[rows] = attention_output(ops, n, normed, context[rows.start - rows_out.start:rows.stop - rows_out.start])

    def _attention(self, queries: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray, mask: np.ndarray,
                   length: int) -> np.ndarray:
        """queries [Q, heads, hd] (already scaled by net_attention_scale) with their mask rows [Q, length], attending
        to the first ``length`` positions of the cache [1, heads, capacity, hd] -> the context, written over
        ``queries``. The kernel's threads take the heads HEAD_GROUP at a time: that group's keys and values widened to
        fp32 (an fp16 cache is converted once per layer, not per chunk), QUERY_CHUNK queries' scores at a time, on one
        BLAS thread each (see ``PromptScope``)."""

        kernels = self.kernels

        def heads(first: int, end: int, _worker: int) -> None:
            for group in _chunks(end - first, HEAD_GROUP, first):
                keys = kernels.widen_heads(key_cache[0, group, :length]).transpose(0, 2, 1)  # [g, hd, L]
                values = kernels.widen_heads(value_cache[0, group, :length])  # [g, L, hd]
                for rows in _chunks(len(queries), QUERY_CHUNK):
                    scores = queries[rows, group].transpose(1, 0, 2) @ keys  # [g, chunk, L]
                    kernels.masked_softmax(scores, mask[rows], MASK_FILL)
                    queries[rows, group] = (scores @ values).transpose(1, 0, 2)

        split(self.kernels.pool, self.kernels.threads, heads, queries.shape[1], HEAD_GROUP)
        return queries


class PromptScope:
    """What a running prompt changes for the whole process. Engines of one process (the service's replicas) may
    prefill at once, so the first prompt in makes the changes and the last one out undoes those that can be undone:

    - numpy's BLAS is held to one thread: the attention's small matmuls already run one per kernel thread, and
      OpenBLAS's own threads, waiting on cores the kernel's threads hold, made a 128-token prompt's attention 100x
      slower on a busy 2-core machine;
    - the C allocator (glibc's; others are left alone) keeps freed temporaries for the next ones: from the first
      prompt on its thresholds are fixed at ``MALLOC_THRESHOLDS`` (glibc cannot return to adapting). Adapting, it
      handed most of a layer's temporaries (2-8 MB each) back to the system as they were freed and faulted them in
      again for the next: 83-88 thousand page faults and 0.3-0.4 s of system time per 128-token prompt, 14-19
      thousand and 0.1 s with the fixed thresholds (docs/decisions.md);
    - on the way out the allocator gives the prompt's freed temporaries back to the system (``malloc_trim``): kept,
      the next peak lands on top of them (at context 2048 the bench peaked at 5.02 GB without, 4.99 with it).
    """

    def __init__(self) -> None:
        self.lock, self.running, self.limit = threading.Lock(), 0, None

    def __enter__(self) -> None:
        with self.lock:
            if not self.running:
                self.limit = ThreadpoolController().limit(limits=1, user_api="blas")
                fix_malloc_thresholds()
            self.running += 1

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.running -= 1
            if not self.running:
                self.limit.restore_original_limits()
                if _MALLOC_TRIM is not None:
                    _MALLOC_TRIM(0)


_LIBC = ctypes.CDLL(None)  # the process's C library: glibc has these two, others may not
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)
_MALLOPT = getattr(_LIBC, "mallopt", None) if hasattr(_LIBC, "gnu_get_libc_version") else None
# glibc's mallopt options: blocks from 32 MB up get their own mapping (a layer's temporaries stay in the heap), and
# up to 32 MB free at the heap's top stays mapped (the most a prompt's peak grows by)
MALLOC_THRESHOLDS = {-3: 32 << 20, -1: 32 << 20}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


@functools.cache
def fix_malloc_thresholds() -> None:
    """glibc's thresholds set to ``MALLOC_THRESHOLDS``, once per process (the setting is the process's, and stays)."""
    if _MALLOPT is not None:
        for option, value in MALLOC_THRESHOLDS.items():
            _MALLOPT(option, value)


PROMPT_SCOPE = PromptScope()


class _KernelOps(NumpyOps):
    """The definition's operations for prompt rows [rows, hidden]: linear layers, LayerNorm, GELU and the logits on
    the C kernels, the rest in numpy; the bundle's weights by name."""

    def __init__(self, prefill: Int4Prefill, positions: np.ndarray) -> None:
        super().__init__(prefill.config, prefill.tensors, positions)
        self.kernels, self.head_bits = prefill.kernels, prefill.head_bits

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        weight = _int4_weight(self.weights, name)
        try:
            return self.kernels.matmul(self.kernels.quantize(x, weight.group), weight)
        finally:
            self.weights.release(name + ".")  # the next chunk of rows maps it again from the page cache

    def layer_norm(self, name: str, x: np.ndarray) -> np.ndarray:
        t = self.weights
        return self.kernels.layer_norm(x, t[name + ".weight"], t[name + ".bias"], self.config.layernorm_epsilon)

    def gelu(self, x: np.ndarray) -> np.ndarray:
        return self.kernels.gelu(x)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the word embedding: its own table, or the quantized lm_head it is tied to."""
        t = self.weights
        if EMBEDDING in t:
            return np.array(t[EMBEDDING][ids], dtype=np.float32)
        rows = np.ascontiguousarray(dequantize(ARRAY, t[HEAD + ".qweight"][ids], t[HEAD + ".scales"][ids],
                                               self.head_bits, self.config.hidden_size, row_axes=1))
        t.release(HEAD + ".")  # the rows it touched (and the pages mapped around them) until the logits need it
        return rows

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        """The logits of one row, HEAD_ROWS rows of the table at a time, each chunk's pages dropped after it (the
        whole INT8 table mapped at once would add 0.53 GB to the peak)."""
        t = self.weights
        packed, scales = t[HEAD + ".qweight"], t[HEAD + ".scales"]
        logits = np.empty(len(packed), np.float32)
        for rows in _chunks(len(packed), HEAD_ROWS):
            logits[rows] = self.kernels.logits(x, packed[rows], scales[rows], self.head_bits)
            t.release_rows(HEAD + ".qweight", rows)
        return logits


def _chunks(length: int, size: int, start: int = 0) -> list[slice]:
    """``start .. start + length`` in slices of ``size``."""
    return [slice(start + r, start + min(r + size, length)) for r in range(0, length, size)]
