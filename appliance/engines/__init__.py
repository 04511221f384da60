"""The contract between the generator and a runtime, and the table of runtimes a bundle can run on.

An engine owns tensors and the KV cache, nothing else: the generator computes positions, masks and sampling, so the
numpy reference, onnxruntime and MindSpore Lite are compared on exactly the same calls.

``ENGINES`` names each runtime and, per graph layout it runs (``appliance.targets``), the function that opens such a
bundle on it. Engine modules are imported only when a bundle is opened on them, so this package imports neither
onnxruntime nor onnx; adding an engine is one entry here plus its module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from appliance.errors import EngineError
from appliance.positions import layout_of
from appliance.targets import DECODER, STATIC, TARGETS

if TYPE_CHECKING:
    from appliance.bundle import Bundle

AUTO = "auto"  # the engine a bundle's target names (its manifest's runtime)


class Sequence(Protocol):
    """One conversation's KV cache on an engine."""

    def prefill(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """ids [L] int, position_ids [2, L] int, mask [L, L] bool (True = masked) -> logits [vocab] of the last position."""
        ...

    def step(self, token_id: int, position_ids: np.ndarray) -> np.ndarray:
        """Append one token at position_ids [2] -> logits [vocab] of the new token."""
        ...


class Engine(Protocol):
    """A loaded model that can start sequences; ``max_context`` bounds prompt + answer."""

    name: str
    max_context: int

    def start(self) -> Sequence:
        """A sequence with an empty cache. Callers use one sequence at a time: an engine may reuse one cache and
        retire the previous sequence (the onnxruntime engine does)."""
        ...


class BundleEngine(Engine, Protocol):
    """An engine opened from a bundle: it can say how it prefills a prompt."""

    def prefill_paths(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, Engine]:
        """This engine once per prefill path that computes this prompt (ids [L], mask [L, L]), the path chosen when the
        bundle was opened first, all on the same weights and KV cache: verification and benchmarks run a prompt
        through each. Starting a sequence on one retires the others' sequences."""
        ...


DEVICES = ("cpu", "ascend")  # where an engine can run; ``EngineKind.devices`` says which of them each one can
LOAD_QUANTS = ("int8", "int4")  # weight formats an engine that quantizes at load can hold (``EngineOptions.weights``)


def device_number(text: str) -> int:
    """An NPU number as typed (``--device-id``): one line naming the value when it is not one."""
    if not (text.isascii() and text.isdigit() and len(text) <= 6):
        raise EngineError(f"a device id is an NPU number such as 0, not {text[:20]!r}")
    return int(text)


@dataclass(frozen=True)
class EngineOptions:
    """How to open a bundle's engine: ``threads`` None = the physical cores; ``context`` caps a decoder bundle's
    context window (its KV cache is allocated for that many positions); ``kernels`` False keeps an INT4 bundle on
    onnxruntime's graph, prompts and decode, instead of the C kernels (for comparison); ``progress`` gets one line per stage of
    a long load (MindSpore Lite converting and building each graph).

    ``device`` (``cpu`` or ``ascend``) and ``device_id`` (the NPU number) say where the engine runs: each engine takes
    them from here and nowhere else, and ``EngineKind.open`` refuses an engine the device cannot run (a service opens
    one replica per ``device_id``). ``weights`` None runs the bundle's own precision; ``int8`` or ``int4`` asks an
    engine that quantizes at load (mindspore) to hold its matrices in that format (docs/decisions.md). Bad values are
    refused here, in one line."""

    threads: int | None = None
    context: int | None = None
    kernels: bool = True
    progress: Callable[[str], None] | None = None
    device: str = "cpu"
    device_id: int = 0
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise EngineError(f"device {str(self.device)[:20]!r} is not one of {', '.join(DEVICES)}")
        if type(self.device_id) is not int or not 0 <= self.device_id < 1_000_000:
            raise EngineError(f"a device id is an NPU number such as 0, not {str(self.device_id)[:20]!r}")
        if self.weights is not None and self.weights not in LOAD_QUANTS:
            raise EngineError(f"weights {str(self.weights)[:20]!r} is not one of {', '.join(LOAD_QUANTS)} (or the "
                              "bundle's own)")


@dataclass(frozen=True)
class EngineKind:
    """A runtime: ``opens`` maps each graph layout it runs to the ``module:function`` that opens such a bundle,
    ``function(bundle: Bundle, options: EngineOptions) -> BundleEngine``; ``devices`` are the ``DEVICES`` it runs on;
    ``quantizes`` says whether it can hold weights in a ``LOAD_QUANTS`` format of its own (``EngineOptions.weights``)."""

    name: str
    summary: str  # what `--help` says about it
    opens: dict[str, str]
    devices: tuple[str, ...] = ("cpu",)
    quantizes: bool = False

    def open(self, bundle: Bundle, options: EngineOptions) -> BundleEngine:
        layout = TARGETS[bundle.target].graphs
        if layout not in self.opens:
            raise EngineError(f"{bundle.path} targets {bundle.target}; it cannot run on engine {self.name} (engines for "
                              f"it: {', '.join(e.name for e in ENGINES.values() if layout in e.opens)})")
        if options.device not in self.devices:
            raise EngineError(f"engine {self.name} runs on {' or '.join(self.devices)}, not on {options.device} "
                              f"(engines for {options.device}: "
                              f"{', '.join(e.name for e in ENGINES.values() if options.device in e.devices)})")
        if options.weights and not self.quantizes:
            raise EngineError(f"engine {self.name} runs the bundle's own weights; {options.weights} weights are for "
                              f"engine {', '.join(e.name for e in ENGINES.values() if e.quantizes)}")
        module, function = self.opens[layout].split(":")
        return getattr(importlib.import_module(module), function)(bundle, options)


ENGINES = {kind.name: kind for kind in (
    EngineKind("onnxruntime", "in process on the CPU, every target (Ascend bundles through their fp32 check graphs)",
               {DECODER: "appliance.engines.onnxruntime:open_bundle", STATIC: "appliance.engines.static:open_on_onnxruntime"}),
    EngineKind("mindspore-lite", "a MindSpore Lite step server on the CPU (fp32 check graphs) or an Ascend NPU",
               {STATIC: "appliance.engines.static:open_on_mindspore_lite"}, DEVICES),
    EngineKind("acl", "CANN's pyACL on an Ascend NPU, running the offline models `convert.sh atc` made (310B boards)",
               {STATIC: "appliance.engines.acl_runner:open_on_acl"}, ("ascend",)),
    EngineKind("mindspore", "MindSpore in process (GRAPH_MODE) on an Ascend bundle's weights, on the CPU (fp32) or an "
               "Ascend NPU (fp16); int8/int4 weights quantized at load",
               {STATIC: "appliance.engines.mindspore_engine:open_on_mindspore"}, DEVICES, quantizes=True),
)}


def open_engine(bundle: Bundle, kind: str = AUTO, options: EngineOptions = EngineOptions()) -> BundleEngine:
    """``bundle`` on the engine named ``kind`` (``auto``: the one its target names)."""
    name = TARGETS[bundle.target].runtime if kind == AUTO else kind
    if name not in ENGINES:
        raise EngineError(f"unknown engine {kind!r}: choose one of {', '.join((AUTO, *ENGINES))}")
    return ENGINES[name].open(bundle, options)


def describe_engines() -> str:
    """One line for help texts: every engine name a user can give and what it is."""
    return "; ".join([f"{AUTO} = the bundle's own", *(f"{e.name} = {e.summary}" for e in ENGINES.values())])


def warm_up(engine: Engine, bos_id: int, gmask_id: int) -> None:
    """Run ``[gMASK] <sop>`` and one step right after loading, so the first message does not pay the runtime's first
    runs: onnxruntime initializes its kernels and first touches the KV cache then (docs/performance.md, first message)."""
    ids = [gmask_id, bos_id]
    layout = layout_of(ids, bos_id, gmask_id, gmask_id)
    sequence = engine.start()
    sequence.prefill(np.array(ids), layout.position_ids(), layout.mask())
    sequence.step(bos_id, layout.step_position(len(ids) + 1))
