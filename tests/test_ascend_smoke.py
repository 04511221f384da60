"""The smoke test every Ascend bundle carries (``smoke_test.py``): its one-layer graph reproduces the reference's
logits, the script passes on MindSpore Lite 2.0.0's CPU backend (STREAMCHAT_LITE_PYTHON) for every precision and
target, fails on tampered weights, and stops with a setup error (exit 2) and a hint where mindspore_lite cannot be
imported."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from appliance.ascend_smoke import smoke_script
from appliance.bundle import Bundle, write_manifest
from appliance.engines.static import StaticEngine
from appliance.errors import BundleError
from appliance.positions import layout_of
from model_export.ascend_smoke import SMOKE_PROMPT
from model_export.export import export_bundle
from model_export.verify import THRESHOLDS
from tests.conftest import TINY

LITE = os.environ.get("STREAMCHAT_LITE_PYTHON")
needs_lite = pytest.mark.skipif(not LITE, reason="no MindSpore Lite Python (set STREAMCHAT_LITE_PYTHON; .ci/run does)")
TARGETS, QUANTS = ("ascend-910b", "ascend-310b"), ("fp32", "fp16", "int8")
NPU_SMI = """#!/usr/bin/env bash
cat <<'EOF'
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.rc2                 Version: 23.0.rc2                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 93.0        37                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3161 / 65536         |
+===========================+===============+====================================================+
| 1     910B3               | Warning       | 91.2        36                0    / 0             |
| 0                         | 0000:C2:00.0  | 0           0    / 0          3161 / 65536         |
+===========================+===============+====================================================+
EOF
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMCHAT_CACHE_DIR", str(root / "cache"))
        return {(t, q): export_bundle(TINY, root / f"{t}-{q}", target=t, quant=q).bundle
                for t in TARGETS for q in QUANTS}


def smoke_run(python, bundle, *args, env=None):
    """Run the bundle's smoke_test.py from another folder; (exit status, its stdout lines, its stderr)."""
    proc = subprocess.run([python, str(bundle / "smoke_test.py"), *args], cwd=bundle.parent, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


def smoke_inputs(bundle):
    with np.load(bundle / "smoke" / "inputs.npz", allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def ort_logits(graph, inputs):
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def external(graph):
    """(location, offset, length) of each initializer a graph keeps in its weight file, by name."""
    model = onnx.load(str(graph), load_external_data=False)
    return {t.name: tuple(e.value for e in t.external_data) for t in model.graph.initializer if t.external_data}


@pytest.mark.parametrize("target", TARGETS)
def test_one_layer_graph_reproduces_the_reference_on_onnxruntime(bundles, target):
    bundle = bundles[(target, "fp32")]
    gear = Bundle.open(bundle).manifest["graphs"]["prefill_gears"][0]
    inputs, expected = smoke_inputs(bundle), np.load(bundle / "smoke" / "expected_logits.npy", allow_pickle=False)
    logits, *presents = ort_logits(bundle / "smoke.onnx", inputs)
    assert expected.shape == (1, 21069) and expected.dtype == np.float32
    assert np.abs(logits - expected).max() <= THRESHOLDS["fp32"]["max_abs_diff"]
    assert logits.argmax() == expected.argmax()
    assert len(presents) == 2  # one layer: its key and value
    # the whole (two-layer) model's prefill of the same inputs is another function: the smoke graph stops after layer 0
    whole = ort_logits(bundle / f"prefill_{gear}.onnx", inputs)[0]
    assert np.abs(whole - expected).max() > 0.1
    assert inputs["input_ids"].shape == (1, gear)


@pytest.mark.parametrize("quant", ["fp16", "int8"])
def test_fp16_bundles_smoke_graphs_agree_on_onnxruntime(bundles, quant):
    """The device graph (fp16 compute, what the NPU runs) and the fp32 check graph (what Lite's CPU runs)."""
    bundle = bundles[("ascend-310b", quant)]
    inputs, expected = smoke_inputs(bundle), np.load(bundle / "smoke" / "expected_logits.npy", allow_pickle=False)
    for graph in ("smoke.onnx", "smoke.fp32.onnx"):
        logits = ort_logits(bundle / graph, inputs)[0]
        assert np.abs(logits - expected).max() <= THRESHOLDS["fp16"]["max_abs_diff"], graph
        assert logits.argmax() == expected.argmax(), graph


def test_smoke_graphs_add_no_weight_bytes(bundles):
    """Every tensor the smoke graphs keep outside themselves is one the bundle's graphs already keep, at its place."""
    bundle = bundles[("ascend-310b", "fp16")]
    for smoke, whole in (("smoke.onnx", "prefill_64.onnx"), ("smoke.fp32.onnx", "prefill_64.fp32.onnx")):
        stored, theirs = external(bundle / smoke), external(bundle / whole)
        assert "transformer.layers.0.mlp.dense_4h_to_h.weight" in stored and "lm_head.weight" in stored
        assert not any(name.startswith("transformer.layers.1.") for name in stored)
        assert all(theirs.get(name) == place for name, place in stored.items()), smoke


def test_inputs_are_what_the_engine_feeds_its_smallest_gear(bundles, tokenizer):
    """smoke/inputs.npz holds what StaticSequence.prefill gives the runner for the smoke prompt."""

    class Recorder:
        def reset(self):
            pass

        def run(self, graph, inputs):
            self.graph, self.inputs = graph, inputs
            return np.zeros((1, 4), np.float32)

    bundle = Bundle.open(bundles[("ascend-910b", "int8")])
    graphs, special = bundle.manifest["graphs"], tokenizer.special
    recorder = Recorder()
    engine = StaticEngine("rec", bundle.config, graphs["capacity"], graphs["prefill_gears"], recorder, special.pad)
    ids = tokenizer.encode_prompt(SMOKE_PROMPT)
    layout = layout_of(ids, special.bos, special.gmask, special.mask)
    engine.start().prefill(np.array(ids), layout.position_ids(), layout.mask())
    stored = smoke_inputs(bundle.path)
    assert recorder.graph == "prefill:128" and sorted(stored) == sorted(recorder.inputs)
    for name, value in recorder.inputs.items():
        assert stored[name].dtype == value.dtype and np.array_equal(stored[name], value), name


def test_every_bundle_carries_the_same_script(bundles):
    """The script is StreamChat's text, the same in every bundle: nothing of a bundle is rendered into it."""
    script = smoke_script()
    assert all((bundle / "smoke_test.py").read_text(encoding="utf-8") == script for bundle in bundles.values())
    compile(script, "smoke_test.py", "exec")
    for bundle in (bundles[("ascend-910b", "fp32")], bundles[("ascend-310b", "int8")]):
        names = {f["path"] for f in Bundle.open(bundle).manifest["files"]}
        assert {"smoke_test.py", "smoke/inputs.npz", "smoke/expected_logits.npy", "converter/smoke.ini",
                "converter/smoke.shape"} <= names
    assert "smoke.fp32.onnx" in names and "quant_type=WEIGHT_QUANT" in (bundle / "converter" / "smoke.ini").read_text()
    assert (bundle / "converter" / "smoke.shape").read_text() == (bundle / "converter" / "prefill_64.shape").read_text()


def test_script_names_no_undefined_function(tmp_path):
    """The step server's functions the script embeds bring every function they call (ruff's pyflakes rules, Py3.7)."""
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed")
    (tmp_path / "smoke_test.py").write_text(smoke_script(), encoding="utf-8")
    proc = subprocess.run([ruff, "check", "--no-cache", "--isolated", "--select", "F", "--target-version", "py37",
                           str(tmp_path / "smoke_test.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def resign(bundle):
    """Hash every listed file again and seal the manifest: what anyone who controls the whole folder can do."""
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"] = [{"path": f["path"], "bytes": (bundle / f["path"]).stat().st_size,
                          "sha256": hashlib.sha256((bundle / f["path"]).read_bytes()).hexdigest()}
                         for f in manifest["files"] if (bundle / f["path"]).is_file()]
    write_manifest(bundle, manifest)


def test_bundle_open_refuses_an_edited_or_missing_smoke_test(bundles, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    edited = shutil.copytree(bundles[("ascend-310b", "fp32")], tmp_path / "edited")
    with (edited / "smoke_test.py").open("a") as fh:
        fh.write("print('also this')\n")
    resign(edited)
    with pytest.raises(BundleError, match="smoke_test.py is not the smoke test this StreamChat writes"):
        Bundle.open(edited)
    lacking = shutil.copytree(bundles[("ascend-310b", "fp32")], tmp_path / "lacking")
    (lacking / "smoke" / "expected_logits.npy").unlink()
    resign(lacking)
    with pytest.raises(BundleError, match="lacks smoke/expected_logits.npy, which smoke_test.py reads"):
        Bundle.open(lacking)


@pytest.mark.skipif(importlib.util.find_spec("mindspore_lite") is not None, reason="this Python has mindspore_lite")
def test_without_mindspore_lite_it_is_a_setup_error_with_the_hint(bundles, tmp_path):
    """Run with this Python (no mindspore_lite): exit 2 and the hint. npu-smi is summarized; modules in the bundle
    folder (numpy.py, mindspore_lite.py, and standard modules the script imports) are never imported."""
    bundle = shutil.copytree(bundles[("ascend-910b", "int8")], tmp_path / "bundle")
    marker = tmp_path / "imported"
    for module in ("numpy", "mindspore_lite", "argparse", "json", "tempfile"):
        (bundle / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('{module}')\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "npu-smi").write_text(NPU_SMI)
    (tmp_path / "bin" / "npu-smi").chmod(0o755)
    status, lines, _ = smoke_run(sys.executable, bundle, env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert status == 2 and not marker.exists()
    assert lines[0] == "npu-smi: version 23.0.rc2; NPUs: 0 910B3 (OK), 1 910B3 (Warning)"
    assert lines[1].startswith("mindspore_lite: cannot import it (ModuleNotFoundError: No module named "
                               "'mindspore_lite'): use the Python that has the mindspore_lite wheel (the one "
                               "STREAMCHAT_LITE_PYTHON names")
    assert "set_env.sh" in lines[1]
    assert lines[2:] == [f"SETUP ERROR: no mindspore_lite in {sys.executable}"]


@needs_lite
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("quant", QUANTS)
def test_smoke_test_passes_on_lite_cpu(bundles, target, quant):
    status, lines, err = smoke_run(LITE, bundles[(target, quant)], "--device", "cpu")
    assert status == 0, "\n".join(lines) + err
    graph, precision = ("smoke.onnx", "fp32") if quant == "fp32" else ("smoke.fp32.onnx", "fp16")
    gear = 128 if target == "ascend-910b" else 64
    assert len(lines) == 7 and lines[0].startswith("npu-smi: ") and lines[1].startswith("mindspore_lite: 2.")
    assert lines[2].startswith(f"convert: {graph} (CPU config without weight quantization, converter/smoke.shape, "
                               "optimize general) -> MindIR of ")
    assert lines[3].startswith("build: cpu with converter/runtime.ini in ")
    assert lines[4].startswith(f"run: a prompt of 14 tokens padded to {gear} in ") and lines[4].endswith("[1, 21069]")
    assert lines[5].startswith("compare: max |diff| ") and " (largest |logit| " in lines[5]
    assert f"; {precision} limits: |diff| <= " in lines[5]
    assert "(reference 20385: agrees)" in lines[5] and lines[6] == "PASS"


@needs_lite
def test_tampered_weights_fail(bundles, tmp_path):
    """Layer 0's MLP output weights scaled by 1.5 in the weight file: the logits move, the script says FAIL, exit 1."""
    bundle = shutil.copytree(bundles[("ascend-910b", "fp32")], tmp_path / "bundle")
    location, offset, length = external(bundle / "smoke.onnx")["transformer.layers.0.mlp.dense_4h_to_h.weight"]
    with (bundle / location).open("r+b") as fh:
        fh.seek(int(offset))
        weight = np.frombuffer(fh.read(int(length)), np.float32) * 1.5
        fh.seek(int(offset))
        fh.write(weight.tobytes())
    status, lines, err = smoke_run(LITE, bundle, "--device", "cpu")
    assert status == 1, "\n".join(lines) + err
    assert lines[-1].startswith("FAIL: max |diff| ") and " > 0.0001 x 12.8; cosine " in lines[-1]
    assert lines[-2].startswith("compare: ")


@needs_lite
def test_damaged_smoke_data_is_a_setup_error(bundles, tmp_path):
    bundle = shutil.copytree(bundles[("ascend-310b", "fp16")], tmp_path / "bundle")
    (bundle / "smoke" / "inputs.npz").write_bytes(b"PK\x03\x04 not a zip")
    status, lines, _ = smoke_run(LITE, bundle, "--device", "cpu")
    assert status == 2 and lines[-1].startswith("SETUP ERROR: the smoke test's files cannot be read (")
    assert lines[-1].endswith("): re-copy the bundle") and len(lines) == 3


@needs_lite
def test_the_cli_runs_its_own_script_on_a_checked_bundle(bundles, tmp_path, capfd, monkeypatch):
    """``streamchat bundle smoke-test``: the bundle is checked first (an edited converter file is refused before
    anything runs), then StreamChat's own copy of the script runs on it under the Lite Python."""
    from streamchat.cli import main

    monkeypatch.setenv("STREAMCHAT_LITE_PYTHON", LITE)
    bundle = bundles[("ascend-310b", "int8")]
    assert main(["bundle", "smoke-test", str(bundle), "--device", "cpu"]) == 0
    out = capfd.readouterr().out.splitlines()
    assert out[-1] == "PASS" and out[-2].startswith("compare: ")
    edited = shutil.copytree(bundle, tmp_path / "edited")
    (edited / "converter" / "smoke.ini").write_text("[registry]\nplugin_path=./x.so\n")
    assert main(["bundle", "smoke-test", str(edited), "--device", "cpu"]) == 2
    assert "converter/smoke.ini is 30 bytes but the manifest says" in capfd.readouterr().err
