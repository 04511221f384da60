"""The bundle targets: the graphs each one's export writes, the engine its bundles run on, the shapes it compiles.

One table, read by the bundle reader (manifest validation, the default engine), the exporter (which graphs to write)
and the CLI (help and validation). A target whose graph layout exists is one entry here; an Ascend device also needs its
converter config (``appliance.conversion``).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.model.weights import WEIGHT_PRECISIONS

DECODER = "decoder"  # one graph with dynamic shapes for prefill and decode; the KV cache sized when the bundle opens
STATIC = "static"  # a graph per prefill gear and a decode graph, fixed shapes and a fixed KV cache capacity


@dataclass(frozen=True)
class StaticShapes:
    """The shapes a static target compiles: KV cache capacity and prefill gears (prompts are padded to one). Batch is
    1: a device serves one conversation at a time, and more conversations take more replicas (one per device)."""

    capacity: int
    prefill_gears: tuple[int, ...]


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str  # the engine its bundles run on by default (appliance.engines.ENGINES): the manifest's "runtime"
    graphs: str  # DECODER or STATIC
    summary: str  # what `streamchat export --help` says about it
    shapes: StaticShapes | None = None  # STATIC targets only
    quants: tuple[str, ...] = WEIGHT_PRECISIONS  # the --quant choices its export offers, its default first


# no 4-bit choice: Ascend has no kernel for it, and arithmetic unpacking is folded back to floats by the converter
ASCEND_QUANTS = ("int8", "fp16", "fp32")
TARGETS = {target.name: target for target in (
    Target("cpu", "onnxruntime", DECODER, "CPUs"),
    # the model's full 2048-token context; Ascend executes fp16 weights, or 8-bit ones the converter quantized
    Target("ascend-910b", "mindspore-lite", STATIC, "Ascend 910B servers",
           StaticShapes(2048, (128, 512, 2048)), ASCEND_QUANTS),
    # 310B boards share their memory between CPU and NPU: 8-bit weights 6.2 GB + fp16 KV 1024 x 448 KiB = 0.46 GB +
    # runtime and OS need a 16 GB board (docs/ascend.md counts every copy)
    Target("ascend-310b", "mindspore-lite", STATIC, "Ascend 310B boards, 16 GB shared",
           StaticShapes(1024, (64, 256, 1024)), ASCEND_QUANTS),
)}


def describe_targets() -> str:
    """One line for help texts: every target and what it is for."""
    return "; ".join(f"{t.name} = {t.summary}, runs on {t.runtime}" for t in TARGETS.values())
