"""Write an Ascend bundle's graphs, converter config and conversion script.

Graphs (one shared weight file): ``prefill_<gear>.onnx`` per gear and ``decode.onnx`` in the target's compute
precision (fp16, or fp32 for ``--quant fp32``), plus, for fp16 bundles, ``*.fp32.onnx`` copies computing in fp32: MindSpore
Lite 2.0.0's CPU backend cannot build fp16-compute graphs, so machines without an NPU verify the same graph structure
and weights in fp32 (onnxruntime and Lite on CPU).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx

from model_export.ascend_graph import PROFILES, AscendDecoderGraph, spec_for
from model_export.onnx_builder import ExternalData, GraphBuilder

CONVERTER_INI = {
    "ascend-910b": """[ascend_context]
# Lite >= 2.2 with CANN (GE backend): one weight set shared by the prefill and decode graphs.
provider=ge
soc_version=@SOC_VERSION@
precision_mode=must_keep_origin_dtype
dynamic_batch_size=@BATCH_GEARS@
input_shape=@INPUT_SHAPE@

[ge_session_options]
ge.externalWeight=1
ge.exec.formatMode=1
ge.exec.precision_mode=must_keep_origin_dtype
""",
    "ascend-310b": """[ascend_context]
soc_version=@SOC_VERSION@
input_shape=@INPUT_SHAPE@

[acl_build_options]
precision_mode=force_fp16
input_format=ND
""",
}

CONVERT_SH = r"""#!/usr/bin/env bash
# Convert this bundle's ONNX graphs to MindIR for the Ascend NPU. Run on the board or a CANN host with
# MindSpore Lite's converter_lite on PATH. The SoC is read from npu-smi (override: SOC_VERSION=Ascend310B4 ./convert.sh).
set -euo pipefail
cd "$(dirname "$0")"
command -v converter_lite >/dev/null || { echo "convert.sh: converter_lite not found (install MindSpore Lite for CANN)"; exit 2; }
SOC_VERSION=${SOC_VERSION:-}
if [ -z "$SOC_VERSION" ]; then
  chip=$(npu-smi info 2>/dev/null | grep -oE '(910B[0-9]*|310B[0-9]*|310P[0-9]*|910[0-9]*)' | head -n 1 || true)
  [ -n "$chip" ] || { echo "convert.sh: no NPU found by npu-smi; set SOC_VERSION"; exit 2; }
  SOC_VERSION="Ascend${chip}"
fi
echo "convert.sh: target SoC $SOC_VERSION"
mkdir -p mindir
for graph in @GRAPHS@; do
  name=${graph%.onnx}
  shape=$(python3 -c "import json,sys; print(json.load(open('manifest.json'))['graphs']['input_shapes']['$name'])")
  sed -e "s/@SOC_VERSION@/$SOC_VERSION/" -e "s/@BATCH_GEARS@/@BATCHES@/" -e "s/@INPUT_SHAPE@/$shape/" \
      converter.ini > "mindir/$name.ini"
  echo "convert.sh: $graph"
  converter_lite --fmk=ONNX --modelFile="$graph" --outputFile="mindir/$name" --configFile="mindir/$name.ini" \
      --optimize=ascend_oriented
done
python3 - <<'PY'
import hashlib, json, os
manifest = json.load(open("manifest.json"))
files = [f for f in manifest["files"] if not f["path"].startswith("mindir/")]
for name in sorted(os.listdir("mindir")):
    if name.endswith(".mindir"):
        path = "mindir/" + name
        files.append({"path": path, "bytes": os.path.getsize(path),
                      "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()})
manifest["files"] = files
manifest["graphs"]["mindir"] = sorted(f["path"] for f in files if f["path"].startswith("mindir/"))
json.dump(manifest, open("manifest.json", "w"), indent=1, ensure_ascii=False)
print("convert.sh: recorded", len(manifest["graphs"]["mindir"]), "MindIR files in manifest.json")
PY
"""


def _input_shape(profile, gear: int | None, cfg) -> str:
    """converter_lite's input_shape line for one graph (batch -1 where batch gears are dynamic)."""
    batch = -1 if len(profile.batch_gears) > 1 else 1
    seq = gear or 1
    keys = gear or profile.capacity
    shapes = [f"input_ids:{batch},{seq}", f"position_ids:{batch},2,{seq}", f"attention_mask:{batch},1,{seq},{keys}"]
    shapes.append(f"last_position:{batch},{seq},1" if gear else f"write_slot:{batch},1,{profile.capacity},1")
    if not gear:
        for n in range(cfg.num_layers):
            for kind in ("key", "value"):
                shapes.append(f"past_{kind}.{n}:{batch},{cfg.num_heads},{profile.capacity},{cfg.head_dim}")
    return ";".join(shapes)


def write_ascend_graphs(ckpt, source, quant: str, group_size: int, tied: bool, target: str, tmp: Path,
                        on_tensor, doc: str) -> tuple[dict, object]:
    """Write graphs, converter.ini and convert.sh into ``tmp``; return (manifest "graphs" entry, quant report)."""
    cfg, profile = ckpt.config, PROFILES[target]
    capacity = min(profile.capacity, cfg.max_sequence_length)
    gears = sorted({min(g, capacity) for g in profile.prefill_gears})
    spec = spec_for(quant, group_size)
    compute = "fp32" if quant == "fp32" else "fp16"
    data = ExternalData(tmp / "weights.onnx.data")
    shared: dict = {}
    variants = {"": compute} if compute == "fp32" else {"": "fp16", ".fp32": "fp32"}
    files: dict[str, dict] = {}
    report = None
    for suffix, precision in variants.items():
        files[suffix] = {}
        for gear in [*gears, None]:
            graph = AscendDecoderGraph(cfg, source, spec, GraphBuilder(data), tied=tied, compute=precision,
                                       max_positions=cfg.max_sequence_length + 1, capacity=capacity, shared=shared,
                                       on_tensor=on_tensor if report is None else (lambda _: None))
            model = graph.build_static(gear or 1, decode=gear is None, doc=doc)
            name = f"prefill_{gear}" if gear else "decode"
            onnx.save_model(model, str(tmp / f"{name}{suffix}.onnx"))
            files[suffix][f"prefill:{gear}" if gear else "decode"] = f"{name}{suffix}.onnx"
            report = report or graph.report
    data.close()
    (tmp / "converter.ini").write_text(CONVERTER_INI[target])
    graph_list = " ".join(files[""].values())
    script = (CONVERT_SH.replace("@GRAPHS@", graph_list)
              .replace("@BATCHES@", ",".join(map(str, profile.batch_gears))))
    (tmp / "convert.sh").write_text(script)
    os.chmod(tmp / "convert.sh", os.stat(tmp / "convert.sh").st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    entry = {"device": files[""], "check": files.get(".fp32", files[""]), "compute": compute,
             "check_compute": "fp32", "capacity": capacity, "prefill_gears": gears,
             "batch_gears": list(profile.batch_gears), "kv_layout": "[batch, heads, capacity, head_dim]",
             "input_shapes": {Path(p).stem: _input_shape(profile, int(k.split(":")[1]) if ":" in k else None, cfg)
                              for k, p in files[""].items()},
             "mindir": []}
    return entry, report
