"""What Ascend bundles become when MindSpore Lite converts them, checked with Lite 2.0.0 on this machine.

- Size: every device graph of every Ascend quantization, converted with its bundle's own converter settings, gives a
  MindIR of at most 1.25x the weight bytes it should hold (fp32 / fp16 as stored; int8: one byte per matrix
  weight). This catches constant folding (an in-graph unpacking folded back into floats) and duplication (a weight
  folded into a second, transposed copy).
- ``convert.sh``'s own code path, run with ``tests/tools/converter_lite`` (the converter's flags on Lite's Python API),
  records MindIR that the engine then builds without converting again, and reproduces the reference's greedy ids.

Lite 2.0.0 without CANN cannot run the Ascend-oriented passes (``--optimize=ascend_oriented`` fails without the
NPU toolkit), so these conversions run Lite's general passes; docs/ascend.md says so in its "verified where" table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest

from appliance.targets import ASCEND_QUANTS
from model_export.export import export_bundle
from streamchat.cli import main
from tests.conftest import GOLDEN, TINY

LITE = os.environ.get("STREAMCHAT_LITE_PYTHON")
pytestmark = pytest.mark.skipif(not LITE, reason="no MindSpore Lite Python (set STREAMCHAT_LITE_PYTHON; .ci/run does)")
TOOLS = Path(__file__).with_name("tools")
SIZE_LIMIT = 1.25


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[tuple[str, str], Path]:
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("bundles")
    return {(target, quant): export_bundle(TINY, root / f"{target}-{quant}", target=target, quant=quant).bundle
            for target in ("ascend-310b", "ascend-910b") for quant in ASCEND_QUANTS}


def expected_weight_bytes(graph: Path, quant: str) -> int:
    """The bytes of the weights ``graph`` reads, as its MindIR should hold them: as stored, or for int8 one byte per
    element of each matrix (``*.weight``, 2-D) that the converter quantizes."""
    total = 0
    for tensor in onnx.load(str(graph), load_external_data=False).graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        quantized = quant == "int8" and tensor.name.endswith(".weight") and len(tensor.dims) == 2
        total += count * (1 if quantized else itemsize)
    return total


def convert_sh(bundle: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{TOOLS}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(bundle / "convert.sh")], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("quant", ASCEND_QUANTS)
@pytest.mark.parametrize("target", ["ascend-310b", "ascend-910b"])
def test_every_mindir_holds_its_weights_once(bundles, tmp_path, target, quant):
    bundle = shutil.copytree(bundles[(target, quant)], tmp_path / "b")
    proc = convert_sh(bundle)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    sizes = {}
    for rel in manifest["graphs"]["device"].values():
        mindir = bundle / "mindir" / f"{Path(rel).stem}.mindir"
        weights = expected_weight_bytes(bundle / rel, quant)
        sizes[rel] = mindir.stat().st_size / weights
    assert max(sizes.values()) <= SIZE_LIMIT, sizes
    if quant == "int8":  # the converter did quantize: about half the fp16 graphs' MindIR
        fp16 = bundles[(target, "fp16")]
        for rel in manifest["graphs"]["device"].values():
            assert (bundle / "mindir" / f"{Path(rel).stem}.mindir").stat().st_size < 0.6 * expected_weight_bytes(
                fp16 / rel, "fp16")


def test_the_engine_builds_what_convert_sh_recorded(bundles, tmp_path, capsys, monkeypatch):
    """An fp32 bundle's device graphs are the ones the CPU runs: after convert.sh, the engine builds its MindIR (no
    conversion, nothing written to the cache) and gives the fixture's greedy ids."""
    bundle = shutil.copytree(bundles[("ascend-310b", "fp32")], tmp_path / "b")
    proc = convert_sh(bundle)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "recorded 3 MindIR and 0 OM files" in proc.stdout
    cache = tmp_path / "cache"
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(cache))
    prompt = GOLDEN["prompts"][0]
    assert main(["generate", "--bundle", str(bundle), "--engine", "mindspore-lite", "--prompt", prompt["query"],
                 "--greedy", "--max-new-tokens", "24", "--repetition-penalty", "1.2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["token_ids"] == prompt["greedy"]["rp1.2"]["new_token_ids"]
    assert "converting" not in err and err.count("MindSpore Lite: building") == 3, err
    assert not list(cache.rglob("*.mindir"))


def test_without_recorded_mindir_the_engine_converts_once_with_the_bundle_settings(bundles, tmp_path, capsys,
                                                                                    monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(cache))
    bundle = bundles[("ascend-910b", "fp32")]
    for expected in ("converting", None):
        assert main(["generate", "--bundle", str(bundle), "--engine", "mindspore-lite", "--prompt", "你好",
                     "--greedy", "--max-new-tokens", "2"]) == 0
        err = capsys.readouterr().err
        assert (err.count("MindSpore Lite: converting") == 3) == (expected == "converting"), err
    configs = sorted(p.read_text() for p in cache.rglob("*.ini") if p.name != "runtime.ini")
    assert configs == sorted((bundle / "converter" / f"{Path(rel).stem}.ini").read_text()
                             for rel in json.loads((bundle / "manifest.json").read_text())["graphs"]["device"].values())
    assert [p.read_text() for p in cache.rglob("runtime.ini")] == [(bundle / "converter" / "runtime.ini").read_text()]
