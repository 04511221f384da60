"""What an Ascend bundle holds besides its graphs: the conversion script and one converter config per device graph.

Both are rendered here from the manifest's graph entry, and nowhere else: the export writes exactly these texts, and
``Bundle.open`` requires an Ascend bundle to hold exactly these texts, byte for byte. A bundle can carry any script,
checksummed by its own manifest, so checksums alone do not make ``convert.sh`` safe to run; an operator runs it.

The static graphs' input shapes are stated here too (``static_input_shapes``): the export builds the graphs' inputs
from them and writes them into each converter config's ``input_shape`` line. So is their output order
(``static_output_names``), by which the runners take outputs.
"""

from __future__ import annotations

import re
from pathlib import Path

from appliance.errors import BundleError
from appliance.model_config import ModelConfig

CONVERT_SCRIPT, CONVERTER_FOLDER = "convert.sh", "converter/"

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
# converter settings filled in from the manifest; anything else could change what converter_lite loads or runs
CONFIG_VALUE = re.compile(r"[A-Za-z0-9_.:,;-]+")


def graph_files(gears: list[int], suffix: str = "") -> dict[str, str]:
    """The graph files an Ascend bundle holds, by graph key: one per prefill gear and the decode step."""
    return {**{f"prefill:{g}": f"prefill_{g}{suffix}.onnx" for g in gears}, "decode": f"decode{suffix}.onnx"}


def gear_of(key: str) -> int | None:
    """The sequence gear of a graph key ("prefill:64" -> 64); None for the decode step."""
    return int(key.split(":")[1]) if ":" in key else None


def static_input_shapes(cfg: ModelConfig, capacity: int, gear: int | None, batch: int | str) -> dict[str, list]:
    """The inputs of the prefill graph of ``gear`` (None: the decode step) in graph order, with their shapes.

    ``attention_bias`` is added to the scores (0 visible, MASK_FILL hidden); a prefill graph reads ``last_position``
    (one-hot over the padded gear), a decode step ``write_slot`` (one-hot over the cache) and the cache itself."""
    seq = gear or 1
    shapes: dict[str, list] = {"input_ids": [batch, seq], "position_ids": [batch, 2, seq],
                               "attention_bias": [batch, 1, seq, gear or capacity]}
    if gear:
        shapes["last_position"] = [batch, seq, 1]
        return shapes
    shapes["write_slot"] = [batch, 1, capacity, 1]
    for n in range(cfg.num_layers):
        for kind in ("key", "value"):
            shapes[f"past_{kind}.{n}"] = [batch, cfg.num_heads, capacity, cfg.head_dim]
    return shapes


def static_output_names(cfg: ModelConfig) -> list[str]:
    """The outputs of every static graph (each prefill gear and the decode step) in graph order: ``logits``, then each
    layer's ``present_key.N`` and ``present_value.N``, the order of the decode step's ``past_*`` inputs. Runners take
    outputs by this position, not by name (the Ascend graph compiler may rename outputs)."""
    return ["logits"] + [f"present_{kind}.{n}" for n in range(cfg.num_layers) for kind in ("key", "value")]


def _input_shape(cfg: ModelConfig, capacity: int, batch_gears: list[int], gear: int | None) -> str:
    """converter_lite's input_shape line for one graph (batch -1 where batch gears are dynamic)."""
    batch = -1 if len(batch_gears) > 1 else 1
    shapes = static_input_shapes(cfg, capacity, gear, batch)
    return ";".join(f"{name}:{','.join(map(str, shape))}" for name, shape in shapes.items())


def conversion_files(target: str, capacity: int, gears: list[int], batch_gears: list[int],
                     cfg: ModelConfig) -> dict[str, str]:
    """``convert.sh`` and one converter config per device graph, by bundle path, for a manifest's graph entry."""
    files = {CONVERT_SCRIPT: CONVERT_SH}
    for key, graph in graph_files(gears).items():
        text = CONVERTER_INI[target]
        for placeholder, value in (("@BATCH_GEARS@", ",".join(map(str, batch_gears))),
                                   ("@INPUT_SHAPE@", _input_shape(cfg, capacity, batch_gears, gear_of(key)))):
            if not CONFIG_VALUE.fullmatch(value):
                raise BundleError(f"converter setting {value[:60]!r} is not a plain value; re-export the bundle")
            text = text.replace(placeholder, value)
        files[f"{CONVERTER_FOLDER}{Path(graph).stem}.ini"] = text
    return files


def check_conversion_files(bundle: Path, manifest: dict, cfg: ModelConfig) -> None:
    """An Ascend bundle names the graphs its export writes and holds exactly the conversion files it writes."""
    graphs, source = manifest["graphs"], bundle / "manifest.json"
    device = graph_files(graphs["prefill_gears"])
    check = device if graphs["compute"] == "fp32" else graph_files(graphs["prefill_gears"], ".fp32")
    if graphs["device"] != device or graphs["check"] != check:
        raise BundleError(f"{source}: graphs.device and graphs.check must name the graphs an export writes for gears "
                          f"{graphs['prefill_gears']} ({', '.join(device.values())}); re-export the bundle")
    expected = conversion_files(manifest["target"], graphs["capacity"], graphs["prefill_gears"], graphs["batch_gears"], cfg)
    listed = {f["path"] for f in manifest["files"] if f["path"] == CONVERT_SCRIPT or f["path"].startswith(CONVERTER_FOLDER)}
    if listed != set(expected):
        raise BundleError(f"{source}: the conversion files it lists ({', '.join(sorted(listed))}) are not the ones an "
                          f"export writes ({', '.join(sorted(expected))}); re-export the bundle")
    for rel, text in expected.items():
        data = text.encode()
        if (bundle / rel).stat().st_size != len(data) or (bundle / rel).read_bytes() != data:
            what = "conversion script" if rel == CONVERT_SCRIPT else "converter config"
            raise BundleError(f"{bundle}: {rel} is not the {what} this StreamChat writes (edited, or exported by another "
                              "version): re-export the bundle")
