"""Write an Ascend bundle's graphs, converter configs and conversion script (the texts: ``appliance.conversion``).

Graphs (one shared weight file): ``prefill_<gear>.onnx`` per gear and ``decode.onnx`` in the target's compute
precision (fp16, or fp32 for ``--quant fp32``), plus, for fp16 bundles, ``*.fp32.onnx`` copies computing in fp32:
MindSpore Lite 2.0.0's CPU backend runs fp16-compute graphs wrongly (the top token differs), so machines without an
NPU verify the same graph structure and weights in fp32 (onnxruntime and Lite on CPU).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx

from appliance.conversion import CONVERT_SCRIPT, conversion_files, gear_of, graph_files
from appliance.targets import TARGETS
from model_export.ascend_graph import AscendDecoderGraph, spec_for
from model_export.ascend_smoke import write_smoke_test
from model_export.onnx_builder import ExternalData, GraphBuilder


def write_ascend_graphs(ckpt, source, quant: str, group_size: int, tied: bool, target: str, tmp: Path,
                        on_tensor, doc: str) -> tuple[dict, object]:
    """Write graphs, converter configs and convert.sh into ``tmp``; return (manifest "graphs" entry, quant report)."""
    cfg, shapes = ckpt.config, TARGETS[target].shapes
    capacity = min(shapes.capacity, cfg.max_sequence_length)
    gears = sorted({min(g, capacity) for g in shapes.prefill_gears})
    spec = spec_for(quant, group_size)
    compute = "fp32" if quant == "fp32" else "fp16"
    data = ExternalData(tmp / "weights.onnx.data")
    shared: dict = {}
    variants = {"": compute} if compute == "fp32" else {"": "fp16", ".fp32": "fp32"}
    report = None
    for suffix, precision in variants.items():
        for key, file in graph_files(gears, suffix).items():
            graph = AscendDecoderGraph(cfg, source, spec, GraphBuilder(data), tied=tied, compute=precision,
                                       max_positions=cfg.max_sequence_length + 1, capacity=capacity, shared=shared,
                                       on_tensor=on_tensor if report is None else (lambda _: None))
            onnx.save_model(graph.build_static(gear_of(key), doc=doc), str(tmp / file))
            report = report or graph.report
    write_smoke_test(ckpt, tmp, gears, variants, lambda config, precision: AscendDecoderGraph(
        config, source, spec, GraphBuilder(data), tied=tied, compute=precision,
        max_positions=cfg.max_sequence_length + 1, capacity=capacity, shared=shared), doc)
    data.close()
    for rel, text in conversion_files(capacity, gears, quant, cfg).items():
        (tmp / rel).parent.mkdir(exist_ok=True)
        (tmp / rel).write_bytes(text.encode())
    script = tmp / CONVERT_SCRIPT
    os.chmod(script, os.stat(script).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    entry = {"device": graph_files(gears), "check": graph_files(gears, ".fp32" if compute == "fp16" else ""),
             "compute": compute, "check_compute": "fp32", "capacity": capacity, "prefill_gears": gears,
             "kv_layout": "[batch, heads, capacity, head_dim]", "mindir": [], "om": []}
    return entry, report
