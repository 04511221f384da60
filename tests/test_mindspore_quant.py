"""Weight-only INT4 and INT8 on the mindspore engine (``EngineOptions.weights``): on the CPU the codes are dequantized
inside the graph a block of rows at a time, which is the verification of the arithmetic (MindSpore's fused
``WeightQuantBatchMatmul`` has no CPU kernel). INT4 within the export stage's INT4 thresholds on the golden fixture
and on the second shape set; the in-graph dequantization equal to the numpy reference run on the same dequantized
weights; the fused op's INT4 layout against CANN's documented formula; an NPU engine's graph using the fused op."""

from __future__ import annotations

import os

import numpy as np
import pytest

from appliance.bundle import Bundle
from appliance.engines import EngineOptions
from appliance.errors import EngineError
from appliance.model.quantize import BITS, quantize_blockwise
from appliance.model.weights import EMBEDDING, LINEARS, LM_HEAD, layer_prefix
from appliance.positions import layout_of
from appliance.tokenizer import ChatGLMTokenizer
from model_export.checkpoint import Checkpoint
from model_export.export import export_bundle
from model_export.reference import ReferenceEngine, ReferenceModel
from model_export.synthetic import write_checkpoint
from model_export.verify import THRESHOLDS, VERIFY_PROMPTS, compare_engines
from streamchat.cli import main
from tests.conftest import TINY
from tests.mindspore_required import require_mindspore
from tests.test_ascend_shapes import WIDE_CACHE

mindspore = require_mindspore("mindspore quantization tests")

from appliance.engines import mindspore_engine  # noqa: E402  (imports mindspore lazily; after the skip for clarity)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    wide = write_checkpoint(tmp_path_factory.mktemp("wide") / "checkpoint", layers=3, seed=7, widths=WIDE_CACHE)
    return {"fixture": TINY, "wide-cache": wide}


@pytest.fixture(scope="module")
def bundles(checkpoints, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("ms-quant")
    return {name: export_bundle(path, root / name, target="ascend-910b", quant="fp16").bundle
            for name, path in checkpoints.items()}


def _limits_hold(metrics: dict, quant: str) -> None:
    limits = THRESHOLDS[quant]
    assert metrics["max_abs_diff"] <= limits.get("max_abs_diff", np.inf), metrics
    assert metrics["min_cosine"] >= limits.get("min_cosine", -1.0), metrics
    assert metrics["mean_cosine"] >= limits.get("mean_cosine", -1.0), metrics
    assert metrics["agreement"] >= limits["agreement"], metrics


@pytest.mark.parametrize("shapes", ["fixture", "wide-cache"])
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_quantized_at_load_within_the_export_thresholds(bundles, checkpoints, shapes, quant):
    """An fp16 bundle's weights held as int4 (linear layers, group 64 at these widths; the table int8) or int8 codes,
    against the reference on the checkpoint, with the export's thresholds for that precision (the second shape set's
    hidden 96 is not a multiple of its group 64: the last group is padding)."""
    engine = Bundle.open(bundles[shapes]).engine(kind="mindspore", weights=quant)
    reference = ReferenceEngine(ReferenceModel.from_checkpoint(Checkpoint(checkpoints[shapes])))
    metrics = compare_engines(engine, reference, ChatGLMTokenizer.from_dir(checkpoints[shapes]), VERIFY_PROMPTS, 8)
    _limits_hold(metrics, quant)
    state, config = engine.runner.state, engine.runner.state.config
    qkv = layer_prefix(0) + LINEARS[0] + ".weight"
    assert state.kinds[qkv] == quant and state.kinds[LM_HEAD] == state.kinds[EMBEDDING] == "int8"
    codes, scales = (group[index] for group, index in zip((state.weights, state.scales), state.blocks[qkv][0], strict=True))
    if quant == "int4":  # MatMulNBits rows: [rows, groups, group / 2] bytes, a scale per group
        groups = -(-config.hidden_size // 64)
        assert (str(codes.dtype), codes.shape[1:], scales.shape[1:]) == ("UInt8", (groups, 32), (groups,))
    else:
        assert (str(codes.dtype), codes.shape[1:], scales.ndim) == ("Int8", (config.hidden_size,), 1)


def test_int4_in_graph_dequantization_is_the_reference_on_the_same_weights(bundles, monkeypatch):
    """The arithmetic itself: the engine's INT4 (and its int8 table) against the numpy reference run on exactly the
    values the codes stand for, at the fp32 threshold, with the widening budget so small that the table is split into
    42 row blocks (the embedding gathered across blocks, the head multiplied block after block)."""
    monkeypatch.setattr(mindspore_engine, "WIDEN_ELEMENTS", 1 << 15)
    bundle = Bundle.open(bundles["fixture"])
    engine = bundle.engine(kind="mindspore", weights="int4")
    state, config = engine.runner.state, bundle.config
    assert len(state.blocks[LM_HEAD]) == -(-config.vocab_size // 512) > 1  # 512 rows of 64
    values = {}
    for name, weight in mindspore_engine.read_weights(bundle).items():
        if weight.ndim == 1:
            values[name] = np.asarray(weight, np.float32)
        elif name in (EMBEDDING, LM_HEAD):
            codes, scales = mindspore_engine.int8_codes(weight)
            values[name] = codes.astype(np.float32) * scales[:, None]
        else:
            values[name] = quantize_blockwise(weight, BITS["int4"], state.group).dequantize()
    reference = ReferenceEngine(ReferenceModel(config, values))
    metrics = compare_engines(engine, reference, ChatGLMTokenizer.from_dir(TINY), VERIFY_PROMPTS[:2], 6)
    assert metrics["max_abs_diff"] <= THRESHOLDS["fp32"]["max_abs_diff"] and metrics["agreement"] == 1.0, metrics


def test_the_fused_int4_layout_follows_canns_formula():
    """``int4_fused_layout`` as CANN documents WeightQuantBatchMatmul's INT4 weight: [K, N] signed nibbles, two a byte
    along N (low first), scales [groups, N], ``w = value * scale``: decoded by that formula it gives the MatMulNBits
    matrix's own values."""
    weight = np.random.default_rng(3).standard_normal((6, 256)).astype(np.float32)
    q = quantize_blockwise(weight, 4, 64)
    packed, scales = mindspore_engine.int4_fused_layout(q.packed, q.scales, 256)
    assert (packed.shape, scales.shape) == ((256, 3), (4, 6))
    nibbles = np.stack([packed & 15, packed >> 4], -1).reshape(256, 6).astype(np.int8)
    signed = np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.float32)  # two's complement 4-bit
    np.testing.assert_array_equal(signed * np.repeat(scales, 64, axis=0), q.dequantize().T)


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_an_npu_engine_multiplies_with_the_fused_antiquant_matmul(bundles, monkeypatch, quant):
    """With MindSpore's device call recorded instead of made, an ascend engine on this MindSpore (which defines
    WeightQuantBatchMatmul) builds its graphs on the fused op: MindSpore's CPU then refuses exactly that op when the
    first graph compiles. Whether the NPU runs it: not checked here (no NPU)."""
    monkeypatch.setattr(mindspore, "set_device", lambda target, device_id=None: None)
    engine = Bundle.open(bundles["fixture"]).engine(kind="mindspore", device="ascend", weights=quant)
    assert engine.runner.state.fused
    config = engine.runner.state.config
    ids = [5, 6, 7, config.gmask_token_id, config.bos_token_id]
    layout = layout_of(ids, config.bos_token_id, config.gmask_token_id, config.mask_token_id)
    with pytest.raises(RuntimeError, match=r"Unsupported op \[WeightQuantBatchMatmul\] on CPU"):
        engine.start().prefill(np.array(ids), layout.position_ids(), layout.mask())


def test_cpu_engines_never_pick_the_fused_op():
    assert not mindspore_engine.fused_matmul_available("cpu")
    assert mindspore_engine.fused_matmul_available("ascend") == hasattr(mindspore.ops.auto_generate,
                                                                         "WeightQuantBatchMatmul")


@pytest.mark.parametrize(("options", "message"), [
    ({"device": "npu"}, "device 'npu' is not one of cpu, ascend"),
    ({"device_id": -1}, "a device id is an NPU number such as 0, not '-1'"),
    ({"device_id": "0"}, "a device id is an NPU number such as 0, not '0'"),
    ({"weights": "int2"}, "weights 'int2' is not one of int8, int4 (or the bundle's own)"),
])
def test_engine_options_refuse_bad_values_in_one_line(options, message):
    with pytest.raises(EngineError) as caught:
        EngineOptions(**options)
    assert str(caught.value) == message


def test_weights_are_for_the_engine_that_quantizes(bundles, capsys):
    assert main(["generate", "--bundle", str(bundles["fixture"]), "--engine", "onnxruntime", "--weights", "int4",
                 "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == ("error: engine onnxruntime runs the bundle's own weights; int4 weights "
                                               "are for engine mindspore")
