"""Decode steps of INT4 ``cpu`` bundles on the C kernels: the model definition's step recorded once
(``appliance.kernels.step_program``) and run per token over a repacked copy of the weights on one thread team.

Why: decode reads every weight once per token, so its speed is the rate the weights stream from memory. Measured side
by side (docs/performance.md), the GEMV on four columns interleaved per stream reads closer to the memory's limit than
onnxruntime's MatMulNBits, and with the whole step in C nothing idles between the kernels. The engine holds one copy of
the weights (the repacked one; the bundle's memory map is only read, its pages dropped) and one fp16 cache, and opens
no onnxruntime session unless a prompt must go through the graph (``prefill``: verification and benchmarks compare
the graph's prefill with the kernel's).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from appliance.engines.int4_prefill import HEAD, BundleTensors, Int4Prefill, _int4_weight
from appliance.engines.memory import allocate_kv_cache
from appliance.kernels.decode_kernels import DecodeKernels
from appliance.kernels.prompt_kernels import matrix_operands
from appliance.kernels.step_program import Head, PackedLinear, StepProgram, attends, record
from appliance.model.definition import rotary_half_table
from appliance.model.numpy_ops import ARRAY
from appliance.model.weights import (
    EMBEDDING,
    FINAL_NORM,
    INPUT_NORM,
    LINEARS,
    POST_ATTENTION_NORM,
    dequantize,
    layer_prefix,
)
from appliance.model_config import ModelConfig

if TYPE_CHECKING:
    from appliance.engines.onnxruntime import OrtDecoder

KV_CACHE = "fp16"  # the step's attention reads an fp16 cache


class PackedWeights:
    """The engine's own copy of a bundle's weights as the recorded step reads them (``step_program.StepWeights``):
    every INT4 matrix repacked (``sc_repack_int4``), scales, biases, norms and the lm_head copied, each matrix's mapped
    pages dropped once copied; the caches are the decoder's."""

    def __init__(self, tensors: BundleTensors, config: ModelConfig, head_bits: int, lib: ctypes.CDLL) -> None:
        self.config, self.tensors = config, tensors
        self.linears: dict[str, PackedLinear] = {}
        self.norms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for n in range(config.num_layers):
            for linear in LINEARS:
                self.linears[layer_prefix(n) + linear] = self._repack(tensors, layer_prefix(n) + linear, lib)
            for norm in (INPUT_NORM, POST_ATTENTION_NORM):
                self.norms[layer_prefix(n) + norm] = self._norm(tensors, layer_prefix(n) + norm)
        self.norms[FINAL_NORM] = self._norm(tensors, FINAL_NORM)
        codes, scales = matrix_operands(tensors[HEAD + ".qweight"], tensors[HEAD + ".scales"])
        self.lm_head = Head(np.array(codes), np.array(scales).reshape(codes.shape[:2]), head_bits,
                            codes.shape[2] * 8 // head_bits)
        tensors.release()
        self.caches: list[np.ndarray] = []

    @staticmethod
    def fits(rows: Int4Prefill) -> bool:
        """Whether every linear layer takes the step's GEMV (``PackedLinear.fits``)."""
        return all(PackedLinear.fits(_int4_weight(rows.tensors, layer_prefix(n) + linear))
                   for n in range(rows.config.num_layers) for linear in LINEARS)

    @staticmethod
    def _repack(tensors: BundleTensors, prefix: str, lib: ctypes.CDLL) -> PackedLinear:
        weight = PackedLinear.of(_int4_weight(tensors, prefix), lib)
        tensors.release(prefix + ".")
        return weight

    @staticmethod
    def _norm(tensors: BundleTensors, name: str) -> tuple[np.ndarray, np.ndarray]:
        return np.array(tensors[name + ".weight"], np.float32), np.array(tensors[name + ".bias"], np.float32)

    def linear(self, name: str) -> PackedLinear:
        return self.linears[name]

    def norm(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.norms[name]

    def head(self) -> Head:
        return self.lm_head

    def cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.caches[2 * layer][0], self.caches[2 * layer + 1][0]

    def embedding(self, token: int) -> np.ndarray:
        """The token's embedding row: the bundle's own table (one row read from the map), or the quantized lm_head it
        is tied to."""
        if EMBEDDING in self.tensors:
            return np.asarray(self.tensors[EMBEDDING][token], np.float32)
        head = self.lm_head
        return dequantize(ARRAY, head.codes[token], head.scales[token], head.bits, self.config.hidden_size, 0)


class KernelDecoder:
    """A decoder with the same surface as ``OrtDecoder`` (the engine and its sequences use either): one fp16 KV cache
    for ``max_context`` positions, decode steps on the recorded program, and the graph's prefill on demand."""

    def __init__(self, rows: Int4Prefill, max_context: int, open_graph: Callable[[], OrtDecoder]) -> None:
        """``rows``: the bundle's prompt path (its memory map is read once here); ``open_graph``: opens the bundle's
        onnxruntime decoder, on the first prompt that must go through the graph."""
        self.config, self.max_context = rows.config, max_context
        self.kernels = DecodeKernels(rows.kernels.lib, rows.kernels.threads)
        self.threads = self.kernels.threads
        self.weights = PackedWeights(rows.tensors, rows.config, rows.head_bits, rows.kernels.lib)
        self.open_graph = open_graph
        self.graph: OrtDecoder | None = None
        self.cache: list[np.ndarray] = []
        self.program: StepProgram | None = None
        self.active = None  # the one sequence the cache holds (OrtSequence)

    @classmethod
    def open(cls, rows: Int4Prefill, max_context: int, kv_cache: str,
             open_graph: Callable[[], OrtDecoder]) -> KernelDecoder | None:
        """The kernel decoder where it applies (an fp16 cache, every matrix in groups of 128 and a row the GEMV takes,
        heads the step's attention takes), else None: onnxruntime then decodes."""
        if kv_cache != KV_CACHE or not attends(rows.config) or not PackedWeights.fits(rows):
            return None
        return cls(rows, max_context, open_graph)

    def allocate_cache(self) -> list[np.ndarray]:
        """The KV cache buffers (``memory.allocate_kv_cache``), allocated on the first call, and the step recorded
        over them."""
        if not self.cache:
            self.cache = allocate_kv_cache(self.config, self.max_context, KV_CACHE)
            self.weights.caches = self.cache
            self.program = record(self.config, self.weights, self.threads)
        return self.cache

    def step(self, token_id: int, position_ids: np.ndarray, past: int) -> np.ndarray:
        """One token at position_ids [2] after ``past`` cached positions -> logits [vocab]."""
        self.allocate_cache()
        inputs = self.program.inputs
        inputs["embedding"][0] = self.weights.embedding(token_id)
        positions = np.asarray(position_ids).reshape(2)
        for row in (0, 1):
            cos, sin = rotary_half_table(positions[row:row + 1], self.config.rotary_dim)
            inputs[f"cos{row}"][0] = cos
            inputs[f"sin{row}"][0] = sin
        self.kernels.run(self.program, past)
        return self.program.output.copy()

    def prefill(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The prompt through the graph's own prefill into this decoder's cache (onnxruntime opened on first use)."""
        if self.graph is None:
            self.graph = self.open_graph()
            self.graph.adopt_cache(self.allocate_cache())
        return self.graph.prefill(ids, position_ids, mask)
