"""The ``cpu`` target's engine: a decoder and a prefill strategy, both chosen when the bundle is opened
(``open_bundle``).

A decoder owns one KV cache: buffers with room for ``max_context`` positions, allocated once and reused by every
sequence (a single-user appliance decodes one conversation at a time; starting a sequence retires the previous one).
``OrtDecoder`` runs the bundle's graph in one onnxruntime session, its cache in the element type the graph declares
(``graphs.kv_cache``: fp16, or fp32 for exact bundles and bundles exported before the field): a graph prefill writes
the prompt's keys/values into the buffers (``present_*`` bound to them through IOBinding), and every decode step binds
them as both ``past_*`` and ``present_*``, so GroupQueryAttention writes the new position in place and no step copies
the cache. Allocating the cache once also keeps onnxruntime's arena from fragmenting around fresh buffers per prompt
(docs/performance.md, memory). ``KernelDecoder`` (``engines/kernel_decode.py``) decodes INT4 bundles on the C kernels
instead, where they take the bundle.

Prompts go through the graph (``GraphPrefill``) or, for INT4 bundles where the C kernels are built and run, through
``KernelPrefill``: every row computed by ``Int4Prefill`` straight into the decoder's buffers, and the last row's logits
(``engines/int4_prefill.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from appliance.engines import EngineOptions
from appliance.engines.cpu import physical_cores
from appliance.engines.int4_prefill import Int4Prefill
from appliance.engines.kernel_decode import KernelDecoder
from appliance.engines.memory import allocate_kv_cache
from appliance.engines.residency import release_clean_pages
from appliance.errors import EngineError
from appliance.model_config import KV_CACHE_DTYPES, UNMARKED_KV_CACHE, ModelConfig

if TYPE_CHECKING:
    from appliance.bundle import Bundle

# The graph's attention inputs: ChatGLM's prefix mask [1, 1, L, L] (True = masked), read by a prefill; and the
# positions cached after the run, [1] int32 (past + L), read by a decode step (GroupQueryAttention attends to them all).
PREFIX_MASK, TOTAL_LENGTH = "prefix_mask", "total_length"
ORT_TYPES = {"tensor(float)": "fp32", "tensor(float16)": "fp16"}  # a cache input's type -> its KV_CACHE_DTYPES name


class OrtDecoder:
    """The decoder graph in one onnxruntime session, and the KV cache it reads and writes in place."""

    def __init__(self, graph: Path, config: ModelConfig, max_context: int, threads: int | None = None,
                 kv_cache: str = UNMARKED_KV_CACHE) -> None:
        """``kv_cache``: the cache's element type the manifest states; the graph must declare the same."""
        self.config = config
        self.max_context = max_context
        self.threads = threads or physical_cores()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A memory pattern, replayed when a prompt length repeats, lays all of a run's activations out in one block
        # beside the arena's, so a repeated long prompt peaks above the first. Without it the peak stays at the first
        # prompt's, at no measured cost in speed (docs/performance.md, memory).
        options.enable_mem_pattern = False
        # Spinning threads burn the cores they wait on; on a busy machine that collapses throughput.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # fatal only: its errors come back as exceptions, which become our one-line error; logged, they would
        # also print (in color, with escape sequences) before it
        options.log_severity_level = 4
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime cannot load {graph.name}: {str(exc).splitlines()[0]}; re-export the bundle "
                              "or run `streamchat verify` on it") from exc
        if (data := graph.with_name(graph.name + ".data")).exists():
            release_clean_pages(data)
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_")]
        declared = {ORT_TYPES.get(i.type, i.type) for i in past}
        if declared != {kv_cache}:
            raise EngineError(f"{graph.name} keeps its KV cache as {', '.join(sorted(declared))}, its manifest says "
                              f"{kv_cache}: re-export the bundle")
        self.kv_cache, self.kv_dtype = kv_cache, KV_CACHE_DTYPES[kv_cache]
        self.past_names = [i.name for i in past]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present_")]
        self.cache: list[np.ndarray] = []  # allocated on first use, shared with onnxruntime as OrtValues
        self.cache_values: list[ort.OrtValue] = []
        self.empty_cache = np.zeros((1, config.num_heads, 0, config.head_dim), self.kv_dtype)  # a prefill's past
        self.step_mask = np.zeros((1, 1, 1, 1), dtype=bool)  # a decode step's prefix_mask: one row, not read
        self.capacity = np.array(max_context, dtype=np.int64)
        # Logits land in a buffer of ours, not in onnxruntime's arena: an arena-held output outlives its run and keeps
        # the chunk it sits in from being shrunk between long prompts.
        self.logits = np.empty((1, config.vocab_size), dtype=np.float32)
        self.logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.active: OrtSequence | None = None  # the one sequence the cache holds
        # A prompt's activations grow with its length; give them back after each prefill, or the arena keeps the
        # largest prompt's worth for good.
        self.shrink_after = ort.RunOptions()
        self.shrink_after.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def allocate_cache(self) -> list[np.ndarray]:
        """The KV cache buffers (``memory.allocate_kv_cache``), allocated on the first call."""
        if not self.cache:
            self.adopt_cache(allocate_kv_cache(self.config, self.max_context, self.kv_cache))
        return self.cache

    def adopt_cache(self, buffers: list[np.ndarray]) -> None:
        """Run on ``buffers`` (another decoder's cache of this shape and type: a graph prefill into the kernel
        decoder's cache) instead of a cache of its own."""
        self.cache = buffers
        self.cache_values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in buffers]

    def prefill(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The whole prompt (ids [L], position_ids [2, L], mask [L, L]) into an empty cache -> logits [vocab]."""
        return self._run(ids[None], position_ids[None], mask[None, None], past=0)

    def step(self, token_id: int, position_ids: np.ndarray, past: int) -> np.ndarray:
        """One token at position_ids [2] after ``past`` cached positions -> logits [vocab]."""
        return self._run(np.array([[token_id]]), position_ids.reshape(1, 2, 1), self.step_mask, past)

    def _run(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray, past: int) -> np.ndarray:
        self.allocate_cache()
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input(PREFIX_MASK, np.ascontiguousarray(mask, dtype=bool))
        binding.bind_cpu_input(TOTAL_LENGTH, np.array([past + ids.shape[1]], dtype=np.int32))
        binding.bind_cpu_input("cache_capacity", self.capacity)
        binding.bind_ortvalue_output("logits", self.logits_value)
        for past_name, present_name, buffer in zip(self.past_names, self.present_names, self.cache_values, strict=True):
            if past:  # decode: read and write the same buffer
                binding.bind_ortvalue_input(past_name, buffer)
            else:  # prefill: an empty cache in, the prompt's keys/values out
                binding.bind_cpu_input(past_name, self.empty_cache)
            binding.bind_ortvalue_output(present_name, buffer)
        try:
            self.session.run_with_iobinding(binding, self.shrink_after if not past else None)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed during a step: {str(exc).splitlines()[0]}") from exc
        return self.logits[0].copy()


class GraphPrefill:
    """Every prompt through the decoder graph's own prefill."""

    name = "graph"

    def takes(self, ids: np.ndarray, mask: np.ndarray) -> bool:
        return True

    def run(self, decoder: OrtDecoder, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return decoder.prefill(ids, position_ids, mask)


class KernelPrefill:
    """INT4 prompts on the C kernels: ``Int4Prefill`` computes every row into the decoder's cache and the last row's
    logits. Beside onnxruntime's decoder, prompts too short to be worth it (``Int4Prefill.takes``) go through the
    graph; beside the kernel decoder every prompt stays here (the graph would load a second copy of the weights)."""

    name = "int4-kernel"

    def __init__(self, rows: Int4Prefill, short_in_graph: bool = True) -> None:
        self.rows, self.short_in_graph = rows, short_in_graph

    def takes(self, ids: np.ndarray, mask: np.ndarray) -> bool:
        return not self.short_in_graph or self.rows.takes(ids)

    def run(self, decoder: OrtDecoder | KernelDecoder, ids: np.ndarray, position_ids: np.ndarray,
            mask: np.ndarray) -> np.ndarray:
        if not self.takes(ids, mask):
            return decoder.prefill(ids, position_ids, mask)
        return self.rows.run(ids, position_ids, mask, decoder.allocate_cache())


class OrtEngine:
    """An engine over a decoder, prefilling prompts by its strategy."""

    name = "onnxruntime"

    def __init__(self, decoder: OrtDecoder, prefill: GraphPrefill | KernelPrefill) -> None:
        self.decoder, self.prefill = decoder, prefill
        self.config, self.max_context, self.threads = decoder.config, decoder.max_context, decoder.threads

    def start(self) -> OrtSequence:
        self.decoder.active = OrtSequence(self)
        return self.decoder.active

    def prefill_paths(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, OrtEngine]:
        paths = {self.prefill.name: self} if self.prefill.takes(ids, mask) else {}
        paths.setdefault(GraphPrefill.name, OrtEngine(self.decoder, GraphPrefill()))
        return paths


class OrtSequence:
    """One conversation on the decoder's KV cache; valid until an engine on that decoder starts another."""

    def __init__(self, engine: OrtEngine) -> None:
        self.engine = engine
        self.decoder = engine.decoder
        self.length = 0

    def _check_active(self) -> None:
        if self.decoder.active is not self:
            raise EngineError("this sequence was retired: the engine has started a newer one")

    def prefill(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.length:
            raise EngineError("a sequence is prefilled once; start a new one for a new prompt")
        self._check_active()
        ids = np.asarray(ids)
        if len(ids) > self.decoder.max_context:
            raise EngineError(f"the prompt has {len(ids)} tokens; the KV cache holds {self.decoder.max_context} positions")
        logits = self.engine.prefill.run(self.decoder, ids, position_ids, mask)
        self.length = len(ids)
        return logits

    def step(self, token_id: int, position_ids: np.ndarray) -> np.ndarray:
        if self.length >= self.decoder.max_context:
            raise EngineError(f"the KV cache holds {self.decoder.max_context} positions and is full")
        self._check_active()
        logits = self.decoder.step(token_id, position_ids, self.length)
        self.length += 1
        return logits


def open_bundle(bundle: Bundle, options: EngineOptions) -> OrtEngine:
    """A ``decoder`` bundle, its cache sized to its ``max_context`` or ``options.context`` if lower. INT4 bundles
    where the C kernels run here (``Int4Prefill.open``) prefill on them, unless ``options.kernels`` is False,
    and decode on them too where ``KernelDecoder.open`` takes the bundle; everything else runs in onnxruntime."""
    graph, config = bundle.path / bundle.manifest["graphs"]["decoder"], bundle.config
    limit = int(bundle.manifest["max_context"])
    context, threads = min(limit, options.context or limit), options.threads or physical_cores()
    kv_cache = bundle.manifest["graphs"].get("kv_cache", UNMARKED_KV_CACHE)

    def graph_decoder() -> OrtDecoder:
        return OrtDecoder(graph, config, context, threads, kv_cache)

    int4 = bundle.manifest["quant"]["weights"] == "int4"  # only INT4 weights can take the kernel: skip reading the graph
    rows = Int4Prefill.open(graph, config, threads) if options.kernels and int4 else None
    if rows is None:
        return OrtEngine(graph_decoder(), GraphPrefill())
    kernel_decoder = KernelDecoder.open(rows, context, kv_cache, graph_decoder)
    if kernel_decoder is not None:
        return OrtEngine(kernel_decoder, KernelPrefill(rows, short_in_graph=False))
    return OrtEngine(graph_decoder(), KernelPrefill(rows))
