"""Write an Ascend bundle's graphs, converter configs and conversion script.

Graphs (one shared weight file): ``prefill_<gear>.onnx`` per gear and ``decode.onnx`` in the target's compute
precision (fp16, or fp32 for ``--quant fp32``), plus, for fp16 bundles, ``*.fp32.onnx`` copies computing in fp32: MindSpore
Lite 2.0.0's CPU backend cannot build fp16-compute graphs, so machines without an NPU verify the same graph structure
and weights in fp32 (onnxruntime and Lite on CPU).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import onnx

from appliance.errors import BundleError
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
# Each graph's converter settings are in converter/<graph>.ini; this script only fills in the SoC, after checking it.
set -euo pipefail
cd "$(dirname "$0")"
command -v converter_lite >/dev/null || { echo "convert.sh: converter_lite not found (install MindSpore Lite for CANN)"; exit 2; }
SOC_VERSION=${SOC_VERSION:-}
if [ -z "$SOC_VERSION" ]; then
  chip=$(npu-smi info 2>/dev/null | grep -oE '(910B[0-9]*|310B[0-9]*|310P[0-9]*|910[0-9]*)' | head -n 1 || true)
  [ -n "$chip" ] || { echo "convert.sh: no NPU found by npu-smi; set SOC_VERSION"; exit 2; }
  SOC_VERSION="Ascend${chip}"
fi
[[ "$SOC_VERSION" =~ ^Ascend[0-9A-Za-z]+$ ]] || { echo "convert.sh: SOC_VERSION must look like Ascend310B4"; exit 2; }
echo "convert.sh: target SoC $SOC_VERSION"

# check: manifest.json matches manifest.sha256; record: list the files under mindir/ and write both again
manifest() {
  python3 - "$1" <<'PY'
import hashlib, json, os, sys

def digest_line(raw):
    return (hashlib.sha256(raw).hexdigest() + "  manifest.json\n").encode()

def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()

raw = open("manifest.json", "rb").read()
if open("manifest.sha256", "rb").read() != digest_line(raw):
    sys.exit("convert.sh: manifest.json does not match manifest.sha256 (edited or damaged): re-copy or re-export the bundle")
if sys.argv[1] == "record":
    manifest = json.loads(raw)
    files = [f for f in manifest["files"] if not f["path"].startswith("mindir/")]
    for folder, _, names in sorted(os.walk("mindir")):
        for path in sorted(os.path.join(folder, name) for name in names):
            files.append({"path": path, "bytes": os.path.getsize(path), "sha256": sha256(path)})
    manifest["files"] = files
    manifest["graphs"]["mindir"] = [f["path"] for f in files if f["path"].endswith(".mindir")]
    raw = json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8")
    for name, data in (("manifest.json", raw), ("manifest.sha256", digest_line(raw))):
        with open(name + ".partial", "wb") as fh:
            fh.write(data)
        os.replace(name + ".partial", name)
    print("convert.sh: recorded", len(manifest["graphs"]["mindir"]), "MindIR files in manifest.json")
PY
}

manifest check
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p mindir
for ini in converter/*.ini; do
  name=$(basename "$ini" .ini)
  sed "s/@SOC_VERSION@/$SOC_VERSION/" "$ini" > "$work/$name.ini"
  echo "convert.sh: $name.onnx"
  converter_lite --fmk=ONNX --modelFile="$name.onnx" --outputFile="mindir/$name" --configFile="$work/$name.ini" \
      --optimize=ascend_oriented
done
manifest record
"""
# converter settings filled in at export; anything else could change what converter_lite loads or runs
CONFIG_VALUE = re.compile(r"[A-Za-z0-9_.:,;-]+")


def graph_files(gears: list[int], suffix: str = "") -> dict[str, str]:
    """The graph files an Ascend bundle holds: one per prefill gear and the decode step."""
    return {**{f"prefill:{g}": f"prefill_{g}{suffix}.onnx" for g in gears}, "decode": f"decode{suffix}.onnx"}


def _gear(key: str) -> int | None:
    """The sequence gear of a graph key ("prefill:64" -> 64); None for the decode step."""
    return int(key.split(":")[1]) if ":" in key else None


def _input_shape(capacity: int, batch_gears: list[int], gear: int | None, cfg) -> str:
    """converter_lite's input_shape line for one graph (batch -1 where batch gears are dynamic)."""
    batch = -1 if len(batch_gears) > 1 else 1
    seq = gear or 1
    shapes = [f"input_ids:{batch},{seq}", f"position_ids:{batch},2,{seq}", f"attention_mask:{batch},1,{seq},{gear or capacity}"]
    shapes.append(f"last_position:{batch},{seq},1" if gear else f"write_slot:{batch},1,{capacity},1")
    if not gear:
        for n in range(cfg.num_layers):
            for kind in ("key", "value"):
                shapes.append(f"past_{kind}.{n}:{batch},{cfg.num_heads},{capacity},{cfg.head_dim}")
    return ";".join(shapes)


def conversion_files(target: str, capacity: int, gears: list[int], batch_gears: list[int], cfg) -> dict[str, str]:
    """``convert.sh`` and one converter config per device graph, by bundle path: what the export writes and what
    ``Bundle.open`` requires an Ascend bundle to hold, byte for byte (an operator runs them)."""
    files = {"convert.sh": CONVERT_SH}
    for key, graph in graph_files(gears).items():
        gear = _gear(key)
        text = CONVERTER_INI[target]
        for placeholder, value in (("@BATCH_GEARS@", ",".join(map(str, batch_gears))),
                                   ("@INPUT_SHAPE@", _input_shape(capacity, batch_gears, gear, cfg))):
            if not CONFIG_VALUE.fullmatch(value):
                raise BundleError(f"converter setting {value[:60]!r} is not a plain value; re-export the bundle")
            text = text.replace(placeholder, value)
        files[f"converter/{Path(graph).stem}.ini"] = text
    return files


def check_conversion_files(bundle: Path, manifest: dict, cfg) -> None:
    """An Ascend bundle names the graphs its export writes and holds exactly the conversion files it writes: a package
    can carry any script, checksummed by its own manifest, so checksums alone do not make ``convert.sh`` safe to run."""
    graphs, source = manifest["graphs"], bundle / "manifest.json"
    device = graph_files(graphs["prefill_gears"])
    check = device if graphs["compute"] == "fp32" else graph_files(graphs["prefill_gears"], ".fp32")
    if graphs["device"] != device or graphs["check"] != check:
        raise BundleError(f"{source}: graphs.device and graphs.check must name the graphs an export writes for gears "
                          f"{graphs['prefill_gears']} ({', '.join(device.values())}); re-export the bundle")
    expected = conversion_files(manifest["target"], graphs["capacity"], graphs["prefill_gears"], graphs["batch_gears"], cfg)
    listed = {f["path"] for f in manifest["files"] if f["path"] == "convert.sh" or f["path"].startswith("converter/")}
    if listed != set(expected):
        raise BundleError(f"{source}: the conversion files it lists ({', '.join(sorted(listed))}) are not the ones an "
                          f"export writes ({', '.join(sorted(expected))}); re-export the bundle")
    for rel, text in expected.items():
        data = text.encode()
        if (bundle / rel).stat().st_size != len(data) or (bundle / rel).read_bytes() != data:
            what = "conversion script" if rel == "convert.sh" else "converter config"
            raise BundleError(f"{bundle}: {rel} is not the {what} this StreamChat writes (edited, or exported by another "
                              "version): re-export the bundle")


def write_ascend_graphs(ckpt, source, quant: str, group_size: int, tied: bool, target: str, tmp: Path,
                        on_tensor, doc: str) -> tuple[dict, object]:
    """Write graphs, converter configs and convert.sh into ``tmp``; return (manifest "graphs" entry, quant report)."""
    cfg, profile = ckpt.config, PROFILES[target]
    capacity = min(profile.capacity, cfg.max_sequence_length)
    gears = sorted({min(g, capacity) for g in profile.prefill_gears})
    batch_gears = list(profile.batch_gears)
    spec = spec_for(quant, group_size)
    compute = "fp32" if quant == "fp32" else "fp16"
    data = ExternalData(tmp / "weights.onnx.data")
    shared: dict = {}
    variants = {"": compute} if compute == "fp32" else {"": "fp16", ".fp32": "fp32"}
    report = None
    for suffix, precision in variants.items():
        for key, file in graph_files(gears, suffix).items():
            gear = _gear(key)
            graph = AscendDecoderGraph(cfg, source, spec, GraphBuilder(data), tied=tied, compute=precision,
                                       max_positions=cfg.max_sequence_length + 1, capacity=capacity, shared=shared,
                                       on_tensor=on_tensor if report is None else (lambda _: None))
            onnx.save_model(graph.build_static(gear or 1, decode=gear is None, doc=doc), str(tmp / file))
            report = report or graph.report
    data.close()
    for rel, text in conversion_files(target, capacity, gears, batch_gears, cfg).items():
        (tmp / rel).parent.mkdir(exist_ok=True)
        (tmp / rel).write_bytes(text.encode())
    os.chmod(tmp / "convert.sh", os.stat(tmp / "convert.sh").st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    entry = {"device": graph_files(gears), "check": graph_files(gears, ".fp32" if compute == "fp16" else ""),
             "compute": compute, "check_compute": "fp32", "capacity": capacity, "prefill_gears": gears,
             "batch_gears": batch_gears, "kv_layout": "[batch, heads, capacity, head_dim]", "mindir": []}
    return entry, report
