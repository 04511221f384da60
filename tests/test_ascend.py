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
            for t in ("ascend-310b", "ascend-910b") for q in ("fp32", "int4")}


@pytest.mark.parametrize("target", ["ascend-310b", "ascend-910b"])
def test_bundle_layout_and_converter_config(ascend, target):
    bundle = Bundle.open(ascend[(target, "int4")])
    graphs = bundle.manifest["graphs"]
    assert bundle.manifest["runtime"] == "mindspore-lite" and bundle.manifest["quant"]["weights"] == "int4"
    assert graphs["compute"] == "fp16" and graphs["check_compute"] == "fp32"
    assert set(graphs["device"]) == {f"prefill:{g}" for g in graphs["prefill_gears"]} | {"decode"}
    ini = (bundle.path / "converter" / "decode.ini").read_text()
    script = (bundle.path / "convert.sh").read_text()
    assert "soc_version=@SOC_VERSION@" in ini and "npu-smi info" in script and "converter_lite" in script
    assert sorted(p.name for p in (bundle.path / "converter").iterdir()) == sorted(
        f"{rel[:-5]}.ini" for rel in graphs["device"].values())
    assert f"attention_bias:{1 if target == 'ascend-310b' else -1},1,1,{graphs['capacity']};" in ini
    assert os.access(bundle.path / "convert.sh", os.X_OK)
    if target == "ascend-910b":
        assert "provider=ge" in ini and "[ge_session_options]" in ini and graphs["batch_gears"] == [1, 2, 3, 4]
    else:
        assert "force_fp16" in ini and "[acl_build_options]" in ini and graphs["capacity"] <= 1024
    for rel in [*graphs["device"].values(), *graphs["check"].values()]:
        model = onnx.load(str(bundle.path / rel), load_external_data=False)
        assert {n.domain for n in model.graph.node} <= {""}, "contrib ops are rejected by MindSpore Lite"
        assert all(t.data_type != onnx.TensorProto.INT4 for t in model.graph.initializer)
        assert all(i.type.tensor_type.elem_type != onnx.TensorProto.INT64 for i in model.graph.input)


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
def test_int4_bundle_on_mindspore_lite_agrees_with_the_reference(ascend, reference_engine, tokenizer):
    engine = Bundle.open(ascend[("ascend-310b", "int4")]).engine(kind="mindspore-lite")
    metrics = compare_engines(engine, reference_engine, tokenizer, VERIFY_PROMPTS[:2], 6)
    limits = THRESHOLDS["int4"]
    assert metrics["min_cosine"] >= limits["min_cosine"] and metrics["mean_cosine"] >= limits["mean_cosine"]
    assert metrics["agreement"] >= limits["agreement"]
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


@pytest.mark.parametrize("quant", ["int4", "fp16"])
def test_fp16_compute_graphs_agree_on_onnxruntime(tmp_path, reference_engine, tokenizer, quant):
    """The graphs an NPU would run (fp16 compute) cannot run on Lite 2.0.0's CPU backend; onnxruntime runs them."""
    from appliance.engines.static import OrtGraphRunner, StaticEngine

    bundle = Bundle.open(export_bundle(TINY, tmp_path / quant, target="ascend-310b", quant=quant).bundle)
    graphs = bundle.manifest["graphs"]
    runner = OrtGraphRunner({k: str(bundle.path / v) for k, v in graphs["device"].items()})
    engine = StaticEngine("fp16", bundle.config, graphs["capacity"], graphs["prefill_gears"], runner,
                          tokenizer.special.pad)
    metrics = compare_engines(engine, reference_engine, tokenizer, VERIFY_PROMPTS, 8)
    limits = THRESHOLDS[quant]
    assert metrics["agreement"] >= limits["agreement"]
    assert metrics["max_abs_diff"] <= limits.get("max_abs_diff", np.inf)
    assert metrics["min_cosine"] >= limits.get("min_cosine", -1)
    assert metrics["mean_cosine"] >= limits.get("mean_cosine", -1)
