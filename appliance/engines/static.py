"""Sequences over the Ascend targets' static graphs, for any runner that can execute them by name.

The generator's calls (prefill with a bool prefix-LM mask, one-token steps) become fixed-shape inputs: the prompt is
right-padded to the smallest prefill gear, the KV cache has a fixed capacity, a one-hot ``write_slot`` says where a
step's K/V go, and ``attention_bias`` (added to the scores: 0 visible, MASK_FILL hidden) carries the prefix-LM mask
and hides the slots not yet written. The runner keeps the cache between calls (the presents, the outputs after the
logits, become the next ``past_*`` inputs, by position), in onnxruntime here or in the MindSpore Lite step server.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from appliance.conversion import CONVERTER_FOLDER, LITE_CONFIG, RUNTIME_CONFIG
from appliance.engines import EngineOptions
from appliance.engines.lite_server import check_output_count, graph_inputs
from appliance.engines.memory import kv_cache_bytes, require_memory
from appliance.errors import EngineError, PromptError
from appliance.folders import cache_dir
from appliance.model.definition import MASK_FILL
from appliance.model_config import ModelConfig

if TYPE_CHECKING:
    from appliance.bundle import Bundle


class GraphRunner(Protocol):
    def reset(self) -> None:
        """Forget the KV cache (a new sequence)."""

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run a graph with these inputs plus the carried cache; keep its presents; return logits [batch, vocab]."""


class StaticEngine:
    """An Engine over static graphs: ``graphs`` maps "prefill:<gear>" and "decode" to what the runner knows."""

    def __init__(self, name: str, config: ModelConfig, capacity: int, gears: list[int], runner: GraphRunner,
                 pad_id: int) -> None:
        """The runner allocates the cache on the first run (in this process or the step server's): refuse here, with
        the sizes, a capacity whose cache cannot fit."""
        require_memory(f"the KV cache for {capacity} positions", kv_cache_bytes(config, capacity),
                       "close other programs, or use a bundle exported for a smaller context")
        self.name, self.config, self.max_context = name, config, capacity
        self.gears, self.runner, self.pad_id = sorted(gears), runner, pad_id

    def start(self) -> StaticSequence:
        self.runner.reset()
        return StaticSequence(self)

    def prefill_paths(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, StaticEngine]:
        """Prompts have one path here: the prefill graph of their gear."""
        return {"graph": self}


def prefill_inputs(ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray, gear: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """A prefill graph's inputs (batch 1) for a prompt right-padded to ``gear``: what the engine runs, and what an
    Ascend bundle's smoke test (``model_export.ascend_smoke``) runs."""
    length = len(ids)
    padded_ids = np.full((1, gear), pad_id, dtype=np.int32)
    padded_ids[0, :length] = ids
    positions = np.zeros((1, 2, gear), dtype=np.int32)
    positions[0, :, :length] = position_ids
    bias = np.full((1, 1, gear, gear), MASK_FILL, dtype=np.float32)
    bias[0, 0, :length, :length] = np.where(mask, MASK_FILL, 0.0)
    bias[0, 0, length:, 0] = 0.0  # padding rows see one slot, so no row is fully masked
    last = np.zeros((1, gear, 1), dtype=np.float32)
    last[0, length - 1, 0] = 1.0
    return {"input_ids": padded_ids, "position_ids": positions, "attention_bias": bias, "last_position": last}


class StaticSequence:
    def __init__(self, engine: StaticEngine) -> None:
        self.engine = engine
        self.length = 0

    def prefill(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        length = len(ids)
        gear = next((g for g in self.engine.gears if g >= length), None)
        if gear is None:
            raise PromptError(f"the prompt has {length} tokens; this bundle's longest prefill gear is "
                              f"{self.engine.gears[-1]}: shorten the conversation or lower the context budget")
        logits = self.engine.runner.run(f"prefill:{gear}", prefill_inputs(ids, position_ids, mask, gear,
                                                                          self.engine.pad_id))
        self.length = length
        return logits[0]

    def step(self, token_id: int, position_ids: np.ndarray) -> np.ndarray:
        capacity = self.engine.max_context
        if self.length >= capacity:
            raise EngineError(f"the KV cache is full ({capacity} tokens)")
        write = np.zeros((1, 1, capacity, 1), dtype=np.float32)
        write[0, 0, self.length, 0] = 1.0
        bias = np.full((1, 1, 1, capacity), MASK_FILL, dtype=np.float32)
        bias[0, 0, 0, : self.length + 1] = 0.0
        logits = self.engine.runner.run("decode", {
            "input_ids": np.array([[token_id]], dtype=np.int32),
            "position_ids": np.asarray(position_ids, dtype=np.int32).reshape(1, 2, 1),
            "attention_bias": bias, "write_slot": write})
        self.length += 1
        return logits[0]


class OrtGraphRunner:
    """The same static graphs through onnxruntime (how Ascend bundles are checked on machines without an NPU)."""

    def __init__(self, files: dict[str, str], threads: int | None = None) -> None:
        import onnxruntime as ort

        from appliance.engines.cpu import physical_cores

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # fatal only: its errors come back as exceptions, which become our one-line error; logged, they would
        # also print (in color, with escape sequences) before it
        options.log_severity_level = 4
        self.sessions = {name: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                         for name, path in files.items()}
        decode = [item.name for item in self.sessions["decode"].get_inputs()] if "decode" in self.sessions else []
        try:
            for name, session in self.sessions.items():
                check_output_count(name, len(session.get_outputs()), decode)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        self.cache: list[np.ndarray] = []

    def reset(self) -> None:
        self.cache = []

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Outputs by position, as the step server takes them (``lite_server`` states the order)."""
        session = self.sessions[graph]
        names = [item.name for item in session.get_inputs()]
        try:
            values = graph_inputs(graph, names, [item.shape for item in session.get_inputs()], inputs, self.cache)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        outputs = session.run(None, dict(zip(names, values, strict=True)))
        self.cache = outputs[1:]
        return outputs[0]


def static_engine(bundle: Bundle, name: str, runner: GraphRunner) -> StaticEngine:
    graphs = bundle.manifest["graphs"]
    return StaticEngine(name, bundle.config, int(graphs["capacity"]), list(graphs["prefill_gears"]), runner,
                        bundle.tokenizer().special.pad)


def _graph_files(bundle: Bundle, kind: str) -> dict[str, str]:
    """The bundle's ``device`` graphs (the target's compute precision) or its fp32 ``check`` graphs, by graph key."""
    return {key: str(bundle.path / rel) for key, rel in bundle.manifest["graphs"][kind].items()}


def open_on_onnxruntime(bundle: Bundle, options: EngineOptions) -> StaticEngine:
    """A static bundle's fp32 check graphs on the CPU (how Ascend bundles are checked without an NPU)."""
    return static_engine(bundle, "onnxruntime", OrtGraphRunner(_graph_files(bundle, "check"), options.threads))


def lite_graphs(bundle: Bundle, device: str) -> dict[str, dict[str, str]]:
    """What the step server loads per graph key: the ONNX file, its converter config and input shapes, and the MindIR
    ``convert.sh`` recorded for it ("" when there is none: the server converts with the same settings).

    On the NPU these are the device graphs with the bundle's converter files. On the CPU they are the fp32 check
    graphs: the same files when the bundle computes in fp32, otherwise the same settings without 8-bit weight
    quantization, whose models Lite 2.0.0's CPU backend cannot build."""
    graphs = bundle.manifest["graphs"]
    kind = "device" if device == "ascend" else "check"
    own = graphs[kind] == graphs["device"]  # the graphs convert.sh converts: its settings, and its MindIR if recorded
    specs = {}
    for key, rel in graphs[kind].items():
        settings = bundle.path / CONVERTER_FOLDER / Path(graphs["device"][key]).stem
        mindir = f"mindir/{Path(rel).stem}.mindir"
        specs[key] = {"onnx": str(bundle.path / rel),
                      "config": settings.with_suffix(".ini").read_text(encoding="utf-8") if own else LITE_CONFIG,
                      "shape": settings.with_suffix(".shape").read_text(encoding="utf-8").strip(),
                      "mindir": str(bundle.path / mindir) if own and mindir in graphs["mindir"] else ""}
    return specs


def open_on_mindspore_lite(bundle: Bundle, options: EngineOptions) -> StaticEngine:
    """A static bundle on MindSpore Lite: its device graphs on NPU ``options.device_id`` (``options.device`` ascend),
    its fp32 check graphs on the CPU otherwise; graphs ``convert.sh`` did not convert are converted on first use into a
    cache per manifest, device and settings."""
    from appliance.bundle import MANIFEST
    from appliance.engines.mindspore_lite import LiteStepServer

    device = options.device
    graphs = lite_graphs(bundle, device)
    optimize = "ascend_oriented" if device == "ascend" else "general"
    stamp = hashlib.sha256((bundle.path / MANIFEST).read_bytes() + json.dumps([graphs, optimize]).encode()).hexdigest()
    runner = LiteStepServer(graphs, cache_dir() / "mindir" / f"{stamp[:16]}-{device}", bundle.config.vocab_size,
                            device=device, threads=options.threads, device_id=options.device_id,
                            progress=options.progress or (lambda line: None),
                            runtime_config=(bundle.path / RUNTIME_CONFIG).read_text(encoding="utf-8"), optimize=optimize)
    return static_engine(bundle, "mindspore-lite", runner)
