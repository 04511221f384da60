"""The ``cpu`` target's engine: one onnxruntime session over the bundle's decoder graph.

The engine owns one KV cache: fp32 buffers with room for ``max_context`` positions, allocated once and reused by every
sequence (a single-user appliance decodes one conversation at a time; starting a sequence retires the previous one).
The prefill writes the prompt's keys/values into them (``present_*`` bound to the buffers through IOBinding), and
every decode step binds them as both ``past_*`` and ``present_*``, so GroupQueryAttention writes the new position in
place and no step copies the cache. Where the AVX2 INT4 kernel applies, a prompt's rows but the last are computed by
``Int4Prefill`` straight into the same buffers, and the last token is a decode step (``engines/int4_prefill.py``).
Allocating the cache once also keeps onnxruntime's arena from fragmenting: when
each prefill returned fresh 2 GB of buffers, a benchmark's ninth prompt peaked 1.6 GB above the first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort

from appliance.engines.cpu import physical_cores
from appliance.engines.int4_prefill import Int4Prefill
from appliance.engines.memory import kv_cache_bytes, not_enough_memory, require_memory
from appliance.engines.residency import release_clean_pages
from appliance.errors import EngineError
from appliance.model_config import ModelConfig


class OrtEngine:
    name = "onnxruntime"

    def __init__(self, graph: Path, config: ModelConfig, max_context: int, threads: int | None = None,
                 spinning: bool = False, prompt_kernel: bool = True) -> None:
        self.config = config
        self.max_context = max_context
        self.threads = threads or physical_cores()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A memory pattern, replayed when a prompt length repeats, lays all of a run's activations out in one block
        # beside the arena's: measured at 2 layers, a repeated 2032-token prompt peaked 0.3 GB above the first.
        # Without it the peak stays at the first prompt's, and neither decode nor prefill measured slower.
        options.enable_mem_pattern = False
        # Spinning threads burn the cores they wait on; on a busy machine that collapses throughput.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime cannot load {graph.name}: {str(exc).splitlines()[0]}; re-export the bundle "
                              "or run `streamchat verify` on it") from exc
        if (data := graph.with_name(graph.name + ".data")).exists():
            release_clean_pages(data)
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present_")]
        self.prompts = Int4Prefill.open(graph, config, self.threads) if prompt_kernel else None
        self.cache: list[np.ndarray] = []  # allocated by the first prefill, shared with onnxruntime as OrtValues
        self.cache_values: list[ort.OrtValue] = []
        self.empty_cache = np.zeros((1, config.num_heads, 0, config.head_dim), dtype=np.float32)  # a prefill's past
        self.capacity = np.array(max_context, dtype=np.int64)
        # Logits land in a buffer of ours, not in onnxruntime's arena: an arena-held output outlives its run and keeps
        # the chunk it sits in from being shrunk (measured at 2 layers: 70 MB more held between long prompts).
        self.logits = np.empty((1, config.vocab_size), dtype=np.float32)
        self.logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.active: OrtSequence | None = None
        # A prompt's activations grow with its length; give them back after each prefill, or the arena keeps the
        # largest prompt's worth for good (measured at 28 layers: +0.6 GB after a 1024-token prompt).
        self.shrink_after = ort.RunOptions()
        self.shrink_after.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    @contextmanager
    def graph_prefill(self) -> Iterator[None]:
        """Prompts go through the graph's own prefill meanwhile (verification and benchmarks compare both paths)."""
        kernel, self.prompts = self.prompts, None
        try:
            yield
        finally:
            self.prompts = kernel

    def start(self) -> OrtSequence:
        self.active = OrtSequence(self)
        return self.active

    def cache_buffers(self) -> list[ort.OrtValue]:
        if not self.cache:
            shape = (1, self.config.num_heads, self.max_context, self.config.head_dim)
            what, needed = f"the KV cache for {self.max_context} positions", kv_cache_bytes(self.config, self.max_context)
            advice = "close other programs or lower the context budget (Settings)"
            require_memory(what, needed, advice)
            try:
                self.cache = [np.empty(shape, np.float32) for _ in self.past_names]
            except MemoryError as exc:
                raise not_enough_memory(what, needed, advice) from exc
            self.cache_values = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in self.cache]
        return self.cache_values


class OrtSequence:
    """One conversation on the engine's KV cache; valid until the engine starts another."""

    def __init__(self, engine: OrtEngine) -> None:
        self.engine = engine
        self.length = 0

    def _check_active(self) -> None:
        if self.engine.active is not self:
            raise EngineError("this sequence was retired: the engine has started a newer one")

    def _run(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        engine = self.engine
        self._check_active()
        binding = engine.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=bool))
        binding.bind_cpu_input("cache_capacity", engine.capacity)
        binding.bind_ortvalue_output("logits", engine.logits_value)
        for past, present, buffer in zip(engine.past_names, engine.present_names, engine.cache_buffers(), strict=True):
            if self.length:  # decode: read and write the same buffer
                binding.bind_ortvalue_input(past, buffer)
            else:  # prefill: an empty cache in, the prompt's keys/values out
                binding.bind_cpu_input(past, engine.empty_cache)
            binding.bind_ortvalue_output(present, buffer)
        try:
            engine.session.run_with_iobinding(binding, None if self.length else engine.shrink_after)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed during a step: {str(exc).splitlines()[0]}") from exc
        self.length += ids.shape[1]
        return engine.logits[0].copy()

    def prefill(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.length:
            raise EngineError("a sequence is prefilled once; start a new one for a new prompt")
        ids, prompts = np.asarray(ids), self.engine.prompts
        if prompts is not None and prompts.takes(ids, mask):
            self._check_active()
            self.engine.cache_buffers()
            prompts.run(ids[:-1], position_ids[:, :-1], mask[:-1, :-1], self.engine.cache)
            self.length = len(ids) - 1
            return self.step(int(ids[-1]), position_ids[:, -1])
        return self._run(ids[None], position_ids[None], mask[None, None])

    def step(self, token_id: int, position_ids: np.ndarray) -> np.ndarray:
        if self.length >= self.engine.max_context:
            raise EngineError(f"the KV cache holds {self.engine.max_context} positions and is full")
        length = np.zeros((1, 1, 1, self.length + 1), dtype=bool)  # decode attends to every cached position
        return self._run(np.array([[token_id]]), position_ids.reshape(1, 2, 1), length)
