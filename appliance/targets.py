"""The bundle targets: the graphs each one's export writes, the engine its bundles run on, the shapes it compiles.

One table, read by the bundle reader (manifest validation, the default engine), the exporter (which graphs to write)
and the CLI (help and validation). A target whose graph layout exists is one entry here; an Ascend device also needs its
converter config (``appliance.conversion``).
"""

from __future__ import annotations

from dataclasses import dataclass

DECODER = "decoder"  # one graph with dynamic shapes for prefill and decode; the KV cache sized when the bundle opens
STATIC = "static"  # a graph per prefill gear and a decode graph, fixed shapes and a fixed KV cache capacity


@dataclass(frozen=True)
class StaticShapes:
    """The shapes a static target compiles: KV cache capacity, prefill gears (prompts are padded to one) and batches."""

    capacity: int
    prefill_gears: tuple[int, ...]
    batch_gears: tuple[int, ...]


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str  # the engine its bundles run on by default (appliance.engines.ENGINES): the manifest's "runtime"
    graphs: str  # DECODER or STATIC
    summary: str  # what `streamchat export --help` says about it
    shapes: StaticShapes | None = None  # STATIC targets only


TARGETS = {target.name: target for target in (
    Target("cpu", "onnxruntime", DECODER, "CPUs"),
    # the model's full 2048-token context, batches up to 4
    Target("ascend-910b", "mindspore-lite", STATIC, "Ascend 910B servers",
           StaticShapes(2048, (128, 512, 2048), (1, 2, 3, 4))),
    # 310B boards share 8 GB between CPU and NPU: INT4 weights ~3.3 GB + fp16 KV 1024 x 448 KiB = 0.46 GB + runtime
    Target("ascend-310b", "mindspore-lite", STATIC, "Ascend 310B boards, 8 GB shared",
           StaticShapes(1024, (64, 256, 1024), (1,))),
)}


def describe_targets() -> str:
    """One line for help texts: every target and what it is for."""
    return "; ".join(f"{t.name} = {t.summary}, runs on {t.runtime}" for t in TARGETS.values())
