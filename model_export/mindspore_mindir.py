"""The mindspore engine's Cells as MindIR (``mindspore.export``): the prefill Cell of one gear and the decode step.

Each file is the Cell ``appliance.engines.mindspore_engine.graph_cell`` compiles, with its weights and its KV cache as
Parameters (the cache written in place by every call, the MindFormers pattern of an incremental step with the cache
as state). Its one input is ``ids [1, L]`` int32; the call's other inputs are Parameters too, named ``in<L>.positions``
[1, 2, L] int32, ``in<L>.bias`` [1, 1, L, capacity] fp32, ``in<L>.slots`` [L] int32 and ``in<L>.last`` [1] int32,
which a caller sets before each call (``Parameter.set_data``) as the engine's runner does: MindSpore 2.10 reads a
Parameter assigned inside ``construct`` as the previous call left it, so the inputs cannot be written by the graph.
Loaded with ``mindspore.load`` + ``nn.GraphCell`` each file holds its own copy of the cache: a decode file run after a
prefill file needs the prefill's cache Parameters (``cache.<layer>.key|value``) copied into it.

MindSpore Lite 2.0.0 does not read these files: MindSpore 2.10 writes MindIR version 3, and both Lite's
``Model.build_from_file`` and its converter stop with "This software can only support the maximum mind ir version: 1,
please install the latest version to support the mind ir version: 3".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.bundle import Bundle
from appliance.errors import BundleError
from appliance.folders import why_not_writable


def export_mindir(bundle: Bundle, out: Path, gear: int | None = None) -> dict[str, Path]:
    """``bundle``'s prefill Cell of ``gear`` (default: its smallest) and its decode Cell as ``prefill_<gear>.mindir``
    and ``decode.mindir`` in the folder ``out`` (made if missing), computed as the mindspore engine computes on the
    CPU; returns the files by graph key (``prefill:<gear>``, ``decode``)."""
    from appliance.engines.mindspore_engine import ModelState, graph_cell, read_weights, select_device

    graphs = bundle.manifest["graphs"]
    gears = graphs["prefill_gears"]
    gear = gears[0] if gear is None else gear
    if gear not in gears:
        raise BundleError(f"{bundle.path} has no prefill gear {gear}: its gears are {', '.join(map(str, gears))}")
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    files = {f"prefill:{gear}": out / f"prefill_{gear}.mindir", "decode": out / "decode.mindir"}
    problem = next((why for why in map(why_not_writable, files.values()) if why), None)
    if problem:
        raise BundleError(problem)
    ms = select_device("cpu", 0)
    state = ModelState(bundle.config, read_weights(bundle), int(graphs["capacity"]),
                       quant="int8" if bundle.manifest["quant"]["weights"] == "int8" else None)
    for key, path in files.items():
        length = gear if key != "decode" else 1
        ids = ms.Tensor(np.zeros((1, length), np.int32))
        ms.export(graph_cell(state, length), ids, file_name=str(path.with_suffix("")), file_format="MINDIR")
    return files
