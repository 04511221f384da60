"""Prompts of INT4 ``cpu`` bundles on the AVX2 kernel, with the decode graph taking over for the last token.

Why: a prompt is arithmetic-bound, and onnxruntime's INT4 kernel multiplies 128 prompt rows at 120-170 GFLOP/s on an
AVX2 CPU; ``appliance/kernels/prompt_kernels.c`` reaches 190-260 on the same weights (docs/performance.md).

How: the layers run here in numpy around the kernel, on the same MatMulNBits codes and scales the graph holds, read
from the bundle's data file through a memory map whose pages are dropped after each layer (the weights then live in
the page cache, not in this process: peak RSS grows by one layer). Keys and values go straight into the engine's KV
cache. Every prompt row but the last is computed here; the last token is then an ordinary decode step of the graph,
which attends to the whole cache and yields the logits. That split is exact for ChatGLM's prefix mask whenever the
last row attends to every position and no earlier row attends to the last one, as for every prompt ending in
``<sop>``; otherwise (and for short prompts, where two passes over the weights cost more than they save) the graph
prefills as before.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appliance.chatglm_ops import ALPHA, MASK_FILL, apply_rotary, layer_norm, rotary_tables, softmax
from appliance.errors import EngineError
from appliance.kernels.prompt_kernels import Int4Weight, PromptKernels, load
from appliance.model_config import ModelConfig

if TYPE_CHECKING:
    import onnx

MIN_PROMPT = 16  # below this the graph's single pass over the weights wins (measured: docs/performance.md)
QUERY_CHUNK = 128  # prompt rows per attention chunk: scores of [heads, 128, length] at a time
MLP_ROWS = 512  # prompt rows per MLP chunk: the 4h activations of 512 rows are 32 MB
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


class BundleTensors:
    """The graph's initializers by name: inline ones decoded, external ones viewed in a read-only memory map."""

    def __init__(self, graph: Path, model: onnx.ModelProto) -> None:
        import onnx
        from onnx import numpy_helper

        self.inline, self.external = {}, {}
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {entry.key: entry.value for entry in tensor.external_data}
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                self.external[tensor.name] = (int(info.get("offset", 0)), tuple(tensor.dims), dtype, info["location"])
            else:
                self.inline[tensor.name] = numpy_helper.to_array(tensor)
        locations = {entry[3] for entry in self.external.values()}
        if len(locations) > 1:
            raise EngineError(f"{graph.name} spreads its weights over {len(locations)} files; expected one")
        self.map = None
        if locations:
            with open(graph.parent / locations.pop(), "rb") as data:
                self.map = mmap.mmap(data.fileno(), 0, access=mmap.ACCESS_READ)

    def __contains__(self, name: str) -> bool:
        return name in self.inline or name in self.external

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.inline:
            return self.inline[name]
        offset, shape, dtype, _ = self.external[name]
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.map, dtype, count, offset).reshape(shape)

    def release(self) -> None:
        """Drop the mapped pages from this process (they stay in the page cache; a later read maps them again)."""
        if self.map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED)


def _linear_attributes(model: onnx.ModelProto) -> dict[str, dict]:
    """MatMulNBits attributes by weight initializer name."""
    import onnx

    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            found[node.input[1]] = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return found


class Int4Prefill:
    """Fills an engine's KV cache with a prompt's keys and values, all rows but the last (see the module's doc)."""

    def __init__(self, config: ModelConfig, tensors: BundleTensors, kernels: PromptKernels, embedding_bits: int) -> None:
        self.config, self.tensors, self.kernels, self.embedding_bits = config, tensors, kernels, embedding_bits

    @classmethod
    def open(cls, graph: Path, config: ModelConfig, threads: int) -> Int4Prefill | None:
        """The prompt path for this graph, or None where it does not apply: no kernel on this machine, or weights
        that are not INT4 with int8 activations (accuracy level 4) in shapes the kernel takes."""
        lib = load()
        if lib is None:
            return None
        import onnx  # only here: the rest of the runtime core does not need it

        model = onnx.load(str(graph), load_external_data=False)
        attributes = _linear_attributes(model)
        tensors = BundleTensors(graph, model)
        for n in range(config.num_layers):
            for linear in LINEARS:
                attrs = attributes.get(f"transformer.layers.{n}.{linear}.qweight")
                if attrs is None or attrs.get("bits") != 4 or attrs.get("accuracy_level") != 4:
                    return None
                weight = tensors[f"transformer.layers.{n}.{linear}.qweight"]
                if attrs["K"] != weight.shape[1] * weight.shape[2] * 2 or not Int4Weight(weight, weight).supported():
                    return None
        head = attributes.get("lm_head.qweight", {})
        return cls(config, tensors, PromptKernels(lib, threads), int(head.get("bits", 0)))

    @staticmethod
    def takes(ids: np.ndarray, mask: np.ndarray) -> bool:
        """Whether the split is exact for this prompt and worth it (see the module's doc)."""
        return len(ids) >= MIN_PROMPT and not mask[-1].any() and bool(mask[:-1, -1].all())

    def run(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray, cache: list[np.ndarray]) -> None:
        """ids [L], position_ids [2, L], mask [L, L] of the rows to compute; cache: the engine's buffers
        ``[1, heads, capacity, head_dim]`` in the graph's order (key, value per layer)."""
        cfg = self.config
        cos = [rotary_tables(position_ids[row], cfg.rotary_dim) for row in (0, 1)]
        x = self._embed(ids)
        try:
            for n in range(cfg.num_layers):
                x = self._layer(n, x, cos, mask, cache[2 * n], cache[2 * n + 1])
                self.tensors.release()
        finally:
            self.tensors.release()

    def _weight(self, prefix: str) -> Int4Weight:
        t = self.tensors
        return Int4Weight(t[prefix + ".qweight"], t[prefix + ".scales"], t[prefix + ".bias"])

    def _linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        weight = self._weight(prefix)
        return self.kernels.matmul(self.kernels.quantize(x, weight.group), weight)

    def _norm(self, x: np.ndarray, prefix: str) -> np.ndarray:
        t = self.tensors
        return layer_norm(x, t[prefix + ".weight"], t[prefix + ".bias"], self.config.layernorm_epsilon)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the word embedding: its own table, or the quantized lm_head it is tied to."""
        t, hidden = self.tensors, self.config.hidden_size
        if "transformer.word_embeddings.weight" in t:
            return np.asarray(t["transformer.word_embeddings.weight"][ids], dtype=np.float32)
        codes = t["lm_head.qweight"][ids]  # [L, blocks, blob]
        if self.embedding_bits == 4:
            codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:2], -1)
        zero = 2 ** (self.embedding_bits - 1)
        values = (codes.astype(np.float32) - zero) * t["lm_head.scales"][ids][..., None]
        return values.reshape(len(ids), -1)[:, :hidden]

    def _layer(self, n: int, x: np.ndarray, tables: list, mask: np.ndarray, key_cache: np.ndarray,
               value_cache: np.ndarray) -> np.ndarray:
        cfg, p = self.config, f"transformer.layers.{n}."
        length, heads, hd, rd = len(x), cfg.num_heads, cfg.head_dim, cfg.rotary_dim
        ln1 = self._norm(x, p + "input_layernorm")
        qkv = self._linear(ln1, p + "attention.query_key_value").reshape(1, length, heads, 3 * hd)
        q, k, v = np.split(qkv, 3, axis=-1)
        (cos0, sin0), (cos1, sin1) = ((c[None], s[None]) for c, s in tables)
        q, k = (np.concatenate([apply_rotary(t[..., :rd], cos0, sin0), apply_rotary(t[..., rd:], cos1, sin1)], axis=-1)[0]
                for t in (q, k))
        v = v[0]
        key_cache[0, :, :length] = k.transpose(1, 0, 2)
        value_cache[0, :, :length] = v.transpose(1, 0, 2)
        context = self._attention(q, key_cache[0, :, :length], value_cache[0, :, :length], mask)
        h = ln1 * ALPHA + self._linear(context, p + "attention.dense")
        ln2 = self._norm(h, p + "post_attention_layernorm")
        out = np.empty_like(ln2)
        for r in range(0, length, MLP_ROWS):
            up = self.kernels.gelu(self._linear(ln2[r:r + MLP_ROWS], p + "mlp.dense_h_to_4h"))
            out[r:r + MLP_ROWS] = ln2[r:r + MLP_ROWS] * ALPHA + self._linear(up, p + "mlp.dense_4h_to_h")
        return out

    def _attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """q [L, heads, hd]; keys/values [heads, L, hd] -> context [L, hidden], QUERY_CHUNK queries at a time."""
        length = len(q)
        queries = q.transpose(1, 0, 2) * np.float32(1 / np.sqrt(self.config.head_dim))  # [heads, L, hd]
        context = np.empty((length, self.config.hidden_size), np.float32)
        for r in range(0, length, QUERY_CHUNK):
            scores = queries[:, r:r + QUERY_CHUNK] @ keys.transpose(0, 2, 1)  # [heads, chunk, L]
            np.copyto(scores, np.float32(MASK_FILL), where=mask[None, r:r + QUERY_CHUNK])
            chunk = softmax(scores) @ values  # [heads, chunk, hd]
            context[r:r + QUERY_CHUNK] = chunk.transpose(1, 0, 2).reshape(chunk.shape[1], -1)
        return context
