"""Ascend bundles, checked without an NPU: standard ops only, exact through onnxruntime, and through MindSpore Lite
2.0.0 on CPU via the step server when a Lite Python is available (STREAMCHAT_LITE_PYTHON, set up by .ci/run)."""

import json
import os
import signal

import numpy as np
import onnx
import pytest

from appliance.bundle import Bundle
from appliance.errors import EngineError, PromptError
from appliance.positions import layout_of
from model_export.export import export_bundle
from model_export.verify import THRESHOLDS, VERIFY_PROMPTS, compare_engines
from streamchat.cli import main
from tests.conftest import GOLDEN, TINY

LITE = os.environ.get("STREAMCHAT_LITE_PYTHON")
needs_lite = pytest.mark.skipif(not LITE, reason="no MindSpore Lite Python (set STREAMCHAT_LITE_PYTHON; .ci/run does)")


@pytest.fixture(scope="module")
def ascend(tmp_path_factory):
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("ascend")
    return {(t, q): export_bundle(TINY, root / f"{t}-{q}", target=t, quant=q).bundle
            for t in ("ascend-310b", "ascend-910b") for q in ("fp32", "int8")}


@pytest.mark.parametrize("target", ["ascend-310b", "ascend-910b"])
def test_bundle_layout_and_converter_config(ascend, target):
    bundle = Bundle.open(ascend[(target, "int8")])
    graphs = bundle.manifest["graphs"]
    assert bundle.manifest["runtime"] == "mindspore-lite" and bundle.manifest["quant"]["weights"] == "int8"
    assert graphs["compute"] == "fp16" and graphs["check_compute"] == "fp32"
    assert set(graphs["device"]) == {f"prefill:{g}" for g in graphs["prefill_gears"]} | {"decode"}
    ini = (bundle.path / "converter" / "decode.ini").read_text()
    script = (bundle.path / "convert.sh").read_text()
    assert "converter_lite" in script and "--inputShape=\"$shape\"" in script and "atc --framework=5" in script
    stems = [rel[:-5] for rel in graphs["device"].values()] + ["smoke"]  # smoke_test.py's one-layer graph
    assert sorted(p.name for p in (bundle.path / "converter").iterdir()) == sorted(
        [f"{stem}{suffix}" for stem in stems for suffix in (".ini", ".shape")] + ["runtime.ini"])
    shape = (bundle.path / "converter" / "decode.shape").read_text()
    assert f"attention_bias:1,1,1,{graphs['capacity']};" in shape and shape.endswith("\n")
    assert os.access(bundle.path / "convert.sh", os.X_OK)
    # keys the converter's parser reads; the graphs' own dtypes kept; 8-bit weights by the converter, on the NPU
    assert "precision_mode=enforce_origin" in ini and "soc_version" not in ini and "force_fp16" not in ini
    assert "quant_type=WEIGHT_QUANT" in ini and "dequant_strategy=ON_THE_FLY" in ini
    assert "provider=ge" in (bundle.path / "converter" / "runtime.ini").read_text()
    assert "quant_type" not in (ascend[(target, "fp32")] / "converter" / "decode.ini").read_text()
    for rel in [*graphs["device"].values(), *graphs["check"].values()]:
        model = onnx.load(str(bundle.path / rel), load_external_data=False)
        assert {n.domain for n in model.graph.node} <= {""}, "contrib ops are rejected by MindSpore Lite"
        assert {t.data_type for t in model.graph.initializer if t.name.endswith(".weight") and len(t.dims) == 2} \
            == {onnx.TensorProto.FLOAT16}
        assert all(i.type.tensor_type.elem_type != onnx.TensorProto.INT64 for i in model.graph.input)


def test_int4_is_refused_for_ascend(tmp_path, capsys):
    assert main(["export", str(TINY), "--out", str(tmp_path / "b"), "--target", "ascend-910b", "--quant", "int4"]) == 2
    assert "--quant int4 is not offered for ascend-910b: choose one of int8, fp16, fp32" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_fp32_bundle_reproduces_the_fixture_on_onnxruntime(ascend, capsys):
    for prompt in GOLDEN["prompts"][:4]:
        for rp in ("1.0", "1.2"):
            assert main(["generate", "--bundle", str(ascend[("ascend-310b", "fp32")]), "--engine", "onnxruntime",
                         "--prompt", prompt["query"], "--greedy", "--max-new-tokens", "24", "--repetition-penalty", rp,
                         "--json"]) == 0
            out = json.loads(capsys.readouterr().out)
            assert out["token_ids"] == prompt["greedy"][f"rp{rp}"]["new_token_ids"]
            assert out["response"] == prompt["greedy"][f"rp{rp}"]["response"]


def test_prompt_longer_than_the_largest_gear_is_refused(ascend, tokenizer):
    engine = Bundle.open(ascend[("ascend-310b", "fp32")]).engine(kind="onnxruntime")
    ids = tokenizer.encode("你好")[-1:] * 298 + [tokenizer.special.gmask, tokenizer.special.bos]  # gears: 64, 256
    layout = layout_of(ids, tokenizer.special.bos, tokenizer.special.gmask, tokenizer.special.mask)
    with pytest.raises(PromptError, match="longest prefill gear is 256"):
        engine.start().prefill(np.array(ids), layout.position_ids(), layout.mask())


@needs_lite
@pytest.mark.parametrize("target", ["ascend-310b", "ascend-910b"])
def test_fp32_bundle_reproduces_the_fixture_on_mindspore_lite(ascend, capsys, target):
    for prompt in (GOLDEN["prompts"][0], GOLDEN["prompts"][2]):
        assert main(["generate", "--bundle", str(ascend[(target, "fp32")]), "--engine", "mindspore-lite",
                     "--prompt", prompt["query"], "--greedy", "--max-new-tokens", "24", "--repetition-penalty", "1.2",
                     "--json"]) == 0, capsys.readouterr().err
        out = json.loads(capsys.readouterr().out)
        assert out["token_ids"] == prompt["greedy"]["rp1.2"]["new_token_ids"]


@needs_lite
def test_int8_bundle_checks_on_mindspore_lite(ascend, reference_engine, tokenizer):
    """On the CPU an int8 bundle runs its fp32 check graphs of the fp16 weights (the 8-bit weights are made by the
    converter on the NPU host): they agree with the reference as fp16 weights do."""
    engine = Bundle.open(ascend[("ascend-310b", "int8")]).engine(kind="mindspore-lite")
    metrics = compare_engines(engine, reference_engine, tokenizer, VERIFY_PROMPTS[:2], 6)
    limits = THRESHOLDS["fp16"]
    assert metrics["max_abs_diff"] <= limits["max_abs_diff"] and metrics["agreement"] >= limits["agreement"]
    engine.runner.close()


@needs_lite
def test_killed_step_server_is_reported_and_restarted(ascend, tokenizer):
    engine = Bundle.open(ascend[("ascend-910b", "fp32")]).engine(kind="mindspore-lite")
    ids = GOLDEN["prompts"][0]["prompt_input_ids"]
    layout = layout_of(ids, tokenizer.special.bos, tokenizer.special.gmask, tokenizer.special.mask)
    seq = engine.start()
    first = seq.prefill(np.array(ids), layout.position_ids(), layout.mask())
    os.kill(engine.runner.pid, signal.SIGKILL)
    with pytest.raises(EngineError, match="step server stopped .* next message restarts it"):
        seq.step(int(first.argmax()), layout.step_position(len(ids) + 1))
    again = engine.start()  # the next message
    np.testing.assert_allclose(again.prefill(np.array(ids), layout.position_ids(), layout.mask()), first, atol=1e-4)
    engine.runner.close()


@pytest.mark.parametrize("quant", ["int8", "fp16"])
def test_fp16_compute_graphs_agree_on_onnxruntime(tmp_path, reference_engine, tokenizer, quant):
    """The graphs an NPU would run (fp16 compute) cannot run on Lite 2.0.0's CPU backend; onnxruntime runs them."""
    from appliance.engines.static import OrtGraphRunner, StaticEngine

    bundle = Bundle.open(export_bundle(TINY, tmp_path / quant, target="ascend-310b", quant=quant).bundle)
    graphs = bundle.manifest["graphs"]
    runner = OrtGraphRunner({k: str(bundle.path / v) for k, v in graphs["device"].items()})
    engine = StaticEngine("fp16", bundle.config, graphs["capacity"], graphs["prefill_gears"], runner,
                          tokenizer.special.pad)
    metrics = compare_engines(engine, reference_engine, tokenizer, VERIFY_PROMPTS, 8)
    limits = THRESHOLDS["fp16"]  # both hold fp16 weights: an int8 bundle's are quantized by the converter
    assert metrics["agreement"] >= limits["agreement"]
    assert metrics["max_abs_diff"] <= limits.get("max_abs_diff", np.inf)
    assert metrics["min_cosine"] >= limits.get("min_cosine", -1)
    assert metrics["mean_cosine"] >= limits.get("mean_cosine", -1)
