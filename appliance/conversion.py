"""What an Ascend bundle holds besides its graphs: the conversion script, the converter settings of each device
graph and the runtime config, and the options the MindSpore Lite engine converts and builds with.

All are rendered here from the manifest's graph entry, and nowhere else: the export writes exactly these texts, and
``Bundle.open`` requires an Ascend bundle to hold exactly these texts, byte for byte. A bundle can carry any script,
checksummed by its own manifest, so checksums alone do not make ``convert.sh`` safe to run; an operator runs it.
The engine's own conversion (on first use, when the bundle holds no recorded MindIR) reads the same files.

Every Ascend bundle also carries a smoke test (``smoke_test.py``, ``appliance.ascend_smoke``): the model's first layer
as one more device graph (``smoke.onnx``, with its converter files; ``convert.sh`` skips it), a prompt's inputs and the
reference's logits for them, which the script converts, runs and compares on the board before the hours of conversion.

The static graphs' input shapes are stated here too (``static_input_shapes``): the export builds the graphs' inputs
from them and writes them into each graph's ``.shape`` file. So is their output order (``static_output_names``), by
which the runners take outputs.
"""

from __future__ import annotations

import re
from pathlib import Path

from appliance.ascend_smoke import smoke_script
from appliance.errors import BundleError
from appliance.model_config import ModelConfig

CONVERT_SCRIPT, CONVERTER_FOLDER = "convert.sh", "converter/"
RUNTIME_CONFIG = CONVERTER_FOLDER + "runtime.ini"
# the smoke test: its script, its one-layer graph's stem (smoke.onnx, and smoke.fp32.onnx in fp16 bundles), its data
SMOKE_SCRIPT, SMOKE_GRAPH = "smoke_test.py", "smoke"
SMOKE_INPUTS, SMOKE_EXPECTED = "smoke/inputs.npz", "smoke/expected_logits.npy"
CONVERTED = {"mindir": ".mindir", "om": ".om"}  # folder and suffix of each route's output, listed by graphs.<folder>

# MindSpore Lite converter settings, per key the source that documents it (docs/ascend.md cites each one):
# - [ascend_context] input_format, precision_mode: config_file_parser.cc reads them (soc_version it does not: the
#   converter compiles for the NPU of the machine it runs on); enforce_origin (CANN must_keep_origin_dtype) keeps
#   the graph's dtypes: fp16 matrix products, fp32 LayerNorm statistics and softmax
# - the input shapes are converter_lite's --inputShape flag, from converter/<graph>.shape
LITE_CONFIG = """[ascend_context]
input_format=ND
precision_mode=enforce_origin
"""
# 8-bit weights: the converter's weight quantization, dequantized by the NPU while running (ON_THE_FLY, Ascend only)
LITE_WEIGHT_QUANT = """
[common_quant_param]
quant_type=WEIGHT_QUANT
bit_num=8
min_quant_weight_size=0
min_quant_weight_channel=16

[weight_quant_param]
dequant_strategy=ON_THE_FLY
"""
# Model.build_from_file's config_path: the GE backend with the graphs' own dtypes (MindFormers' Lite settings)
RUNTIME_INI = """[ascend_context]
provider=ge

[ge_session_options]
ge.exec.formatMode=1
ge.exec.precision_mode=must_keep_origin_dtype
"""

CONVERT_SH = r"""#!/usr/bin/env bash
# Convert this bundle's ONNX graphs for the Ascend NPU of this machine, and record the results in manifest.json.
#   ./convert.sh        MindSpore Lite's converter_lite (on PATH) -> mindir/<graph>.mindir
#   ./convert.sh atc    CANN's ATC (on PATH; the route proven on 310B boards) -> om/<graph>.om; the SoC is read from
#                       npu-smi (override: SOC_VERSION=Ascend310B1 ./convert.sh atc)
# converter_lite's config is written below by StreamChat (the same text as converter/<graph>.ini, which only a
# checked bundle's reader uses: a config can name plugins to load); each graph's input shapes come from
# converter/<graph>.shape, passed as one argument, never as code. `streamchat bundle convert DIR` checks the bundle
# and runs StreamChat's own copy of this script: prefer it to running a copy that came with a bundle.
set -euo pipefail
cd "$(dirname "$0")"
route=${1:-lite}
case "$route" in
  lite) command -v converter_lite >/dev/null \
          || { echo "convert.sh: converter_lite not found (install MindSpore Lite for CANN, or run ./convert.sh atc)"; exit 2; }
        folder=mindir ;;
  atc)  command -v atc >/dev/null || { echo "convert.sh: atc not found: source the CANN toolkit's set_env.sh first"; exit 2; }
        folder=om
        SOC_VERSION=${SOC_VERSION:-}
        if [ -z "$SOC_VERSION" ]; then
          chip=$(npu-smi info 2>/dev/null | grep -oE '(910B[0-9]*|310B[0-9]*|310P[0-9]*|910[0-9]*)' | head -n 1 || true)
          [ -n "$chip" ] || { echo "convert.sh: no NPU found by npu-smi; set SOC_VERSION"; exit 2; }
          SOC_VERSION="Ascend${chip}"
        fi
        [[ "$SOC_VERSION" =~ ^Ascend[0-9A-Za-z]+$ ]] || { echo "convert.sh: SOC_VERSION must look like Ascend310B1"; exit 2; }
        echo "convert.sh: ATC for $SOC_VERSION (keeps the graphs' fp16 weights: 8-bit weights are a converter_lite setting)" ;;
  *)    echo "convert.sh: unknown route '$route': use no argument (converter_lite) or atc"; exit 2 ;;
esac

# check: manifest.json matches manifest.sha256; record: list the files under mindir/ and om/ and write both again
manifest() {
  python3 -I - "$1" <<'PY'
import hashlib, json, os, stat, sys, tempfile

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
    files = [f for f in manifest["files"] if f["path"].split("/")[0] not in ("mindir", "om")]
    for kind, suffix in (("mindir", ".mindir"), ("om", ".om")):
        converted = []
        if os.path.islink(kind):
            sys.exit("convert.sh: %s is a symbolic link: remove it and convert again" % kind)
        for folder, _, names in sorted(os.walk(kind)):
            for path in sorted(os.path.join(folder, name) for name in names):
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    sys.exit("convert.sh: %s is not a regular file: remove it and convert again" % path)
                files.append({"path": path, "bytes": os.path.getsize(path), "sha256": sha256(path)})
                if path.endswith(suffix):
                    converted.append(path)
        manifest["graphs"][kind] = converted
    manifest["files"] = files
    raw = json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8")
    for name, data in (("manifest.json", raw), ("manifest.sha256", digest_line(raw))):
        handle, partial = tempfile.mkstemp(dir=".", prefix=".%s." % name)  # a new file: no link is followed
        with os.fdopen(handle, "wb") as fh:
            fh.write(data)
        os.chmod(partial, 0o644)
        os.replace(partial, name)
    print("convert.sh: recorded", len(manifest["graphs"]["mindir"]), "MindIR and", len(manifest["graphs"]["om"]),
          "OM files in manifest.json")
PY
}

manifest check
work=$(mktemp -d "./.convert.XXXXXX")
config=$(mktemp)
trap 'rm -rf "$work" "$config"' EXIT
cat > "$config" <<'INI'
@CONVERTER_CONFIG@INI
for shapes in converter/*.shape; do
  name=$(basename "$shapes" .shape)
  [ "$name" != smoke ] || continue  # smoke.onnx is smoke_test.py's, converted by it when it runs
  shape=$(cat "$shapes")
  echo "convert.sh: $name.onnx"
  if [ "$route" = lite ]; then
    converter_lite --fmk=ONNX --modelFile="$name.onnx" --outputFile="$work/$name" --configFile="$config" \
        --inputShape="$shape" --optimize=ascend_oriented
    # a model over 2 GB comes as <name>_graph.mindir reading <name>_variables/ by that folder's name
    [ ! -e "$work/${name}_graph.mindir" ] || mv "$work/${name}_graph.mindir" "$work/$name.mindir"
  else
    atc --framework=5 --model="$name.onnx" --output="$work/$name" --soc_version="$SOC_VERSION" --input_format=ND \
        --input_shape="$shape" --precision_mode=must_keep_origin_dtype
    for om in "$work/$name"_*.om; do [ ! -e "$om" ] || mv "$om" "$work/$name.om"; done  # ATC may add _<os>_<arch>
  fi
done
# every graph converted: only now replace what an earlier run recorded, readable by the app's user
chmod -R u+w,a+rX "$work"
rm -rf "$folder"
mv "$work" "$folder"
rm -f "$config"
trap - EXIT
manifest record
"""
# the input-shape texts the export writes, passed to the converters as one argument each: plain values only
CONFIG_VALUE = re.compile(r"[A-Za-z0-9_.:,;-]+")


def convert_script(quant: str) -> str:
    """``convert.sh`` of a bundle of weight precision ``quant``: it carries its converter config itself."""
    return CONVERT_SH.replace("@CONVERTER_CONFIG@", converter_config(quant))


def graph_files(gears: list[int], suffix: str = "") -> dict[str, str]:
    """The graph files an Ascend bundle holds, by graph key: one per prefill gear and the decode step."""
    return {**{f"prefill:{g}": f"prefill_{g}{suffix}.onnx" for g in gears}, "decode": f"decode{suffix}.onnx"}


def smoke_graph_files(gears: list[int], suffix: str = "") -> dict[str, str]:
    """The smoke test's one-layer graph by graph key: a prefill graph of the smallest gear ("smoke:64")."""
    return {f"{SMOKE_GRAPH}:{gears[0]}": f"{SMOKE_GRAPH}{suffix}.onnx"}


def smoke_graphs(graphs: dict) -> list[str]:
    """The smoke graph files of a manifest's graph entry: the device graph, and an fp16 bundle's fp32 check graph."""
    gears, suffix = graphs["prefill_gears"], ".fp32" if graphs["compute"] == "fp16" else ""
    return sorted({*smoke_graph_files(gears).values(), *smoke_graph_files(gears, suffix).values()})


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


def input_shape_text(cfg: ModelConfig, capacity: int, gear: int | None) -> str:
    """One graph's input shapes as converter_lite's --inputShape and ATC's --input_shape take them (batch 1)."""
    shapes = static_input_shapes(cfg, capacity, gear, 1)
    return ";".join(f"{name}:{','.join(map(str, shape))}" for name, shape in shapes.items())


def converter_config(quant: str) -> str:
    """converter_lite's config for a bundle's device graphs: 8-bit weight quantization when ``quant`` is int8."""
    return LITE_CONFIG + (LITE_WEIGHT_QUANT if quant == "int8" else "")


def conversion_files(capacity: int, gears: list[int], quant: str, cfg: ModelConfig) -> dict[str, str]:
    """``convert.sh``, the runtime config, ``smoke_test.py`` and each device graph's converter config and input shapes
    (the smoke graph's too), by bundle path."""
    files = {CONVERT_SCRIPT: convert_script(quant), RUNTIME_CONFIG: RUNTIME_INI, SMOKE_SCRIPT: smoke_script()}
    for key, graph in {**graph_files(gears), **smoke_graph_files(gears)}.items():
        shape = input_shape_text(cfg, capacity, gear_of(key))
        if not CONFIG_VALUE.fullmatch(shape):
            raise BundleError(f"converter setting {shape[:60]!r} is not a plain value; re-export the bundle")
        files[f"{CONVERTER_FOLDER}{Path(graph).stem}.ini"] = converter_config(quant)
        files[f"{CONVERTER_FOLDER}{Path(graph).stem}.shape"] = shape + "\n"
    return files


def check_conversion_files(bundle: Path, manifest: dict, cfg: ModelConfig) -> None:
    """An Ascend bundle names the graphs its export writes, holds exactly the conversion files it writes and lists the
    smoke test's files."""
    graphs, source = manifest["graphs"], bundle / "manifest.json"
    device = graph_files(graphs["prefill_gears"])
    check = device if graphs["compute"] == "fp32" else graph_files(graphs["prefill_gears"], ".fp32")
    if graphs["device"] != device or graphs["check"] != check:
        raise BundleError(f"{source}: graphs.device and graphs.check must name the graphs an export writes for gears "
                          f"{graphs['prefill_gears']} ({', '.join(device.values())}); re-export the bundle")
    expected = conversion_files(graphs["capacity"], graphs["prefill_gears"], manifest["quant"]["weights"], cfg)
    missing = sorted({*smoke_graphs(graphs), SMOKE_INPUTS, SMOKE_EXPECTED} - {f["path"] for f in manifest["files"]})
    if missing:
        raise BundleError(f"{source}: its files list lacks {', '.join(missing)}, which smoke_test.py reads; re-export "
                          "the bundle")
    listed = {f["path"] for f in manifest["files"]
              if f["path"] in (CONVERT_SCRIPT, SMOKE_SCRIPT) or f["path"].startswith(CONVERTER_FOLDER)}
    if listed != set(expected):
        raise BundleError(f"{source}: the conversion files it lists ({', '.join(sorted(listed))}) are not the ones an "
                          f"export writes ({', '.join(sorted(expected))}); re-export the bundle")
    for rel, text in expected.items():
        data = text.encode()
        if (bundle / rel).stat().st_size != len(data) or (bundle / rel).read_bytes() != data:
            what = {CONVERT_SCRIPT: "conversion script", SMOKE_SCRIPT: "smoke test"}.get(rel, "converter config")
            raise BundleError(f"{bundle}: {rel} is not the {what} this StreamChat writes (edited, or exported by another "
                              "version): re-export the bundle")
