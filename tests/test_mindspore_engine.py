"""The mindspore engine (``appliance.engines.mindspore_engine``): an Ascend bundle's weights in the model definition's
Cells, compiled in GRAPH_MODE on the CPU. Greedy ids as the golden fixture and the numpy reference give them (two shape
sets), an fp16-weight bundle within the export's fp16 thresholds, and a KV cache that stays in its Parameters."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest

from appliance.bundle import Bundle
from appliance.engines.mindspore_engine import read_weights
from appliance.errors import BundleError
from appliance.model.weights import EMBEDDING, LM_HEAD
from appliance.positions import layout_of
from appliance.tokenizer import ChatGLMTokenizer
from model_export.checkpoint import Checkpoint
from model_export.export import export_bundle
from model_export.reference import ReferenceEngine, ReferenceModel
from model_export.synthetic import write_checkpoint
from model_export.verify import THRESHOLDS, VERIFY_PROMPTS, compare_engines
from streamchat.cli import main
from tests.conftest import GOLDEN, TINY
from tests.mindspore_required import require_mindspore
from tests.test_ascend_shapes import WIDE_CACHE, _prompts

require_mindspore("mindspore engine tests")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, object]:
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("ms")
    return {quant: export_bundle(TINY, root / quant, target="ascend-910b", quant=quant).bundle
            for quant in ("fp32", "fp16", "int8")}


def _generate(source: list[str], prompt: str, rp: str, capsys, new_tokens: int = 24) -> dict:
    assert main(["generate", *source, "--prompt", prompt, "--greedy", "--max-new-tokens", str(new_tokens),
                 "--repetition-penalty", rp, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_fp32_bundle_reproduces_the_fixture(bundles, capsys):
    for prompt in GOLDEN["prompts"][:2]:
        for rp in ("1.0", "1.2"):
            out = _generate(["--bundle", str(bundles["fp32"]), "--engine", "mindspore"], prompt["query"], rp, capsys)
            assert out["token_ids"] == prompt["greedy"][f"rp{rp}"]["new_token_ids"]
            assert out["response"] == prompt["greedy"][f"rp{rp}"]["response"]


def test_wide_cache_shape_set_gives_the_reference_greedy_ids(tmp_path, capsys):
    """The second shape set of tests/test_ascend_shapes.py: capacity 512 with gears 128/512, hidden 96, 3 layers; a
    short prompt (gear 128) and one longer than the smallest gear."""
    checkpoint = write_checkpoint(tmp_path / "checkpoint", layers=3, seed=7, widths=WIDE_CACHE)
    bundle = export_bundle(checkpoint, tmp_path / "bundle", target="ascend-910b", quant="fp32").bundle
    graphs = Bundle.open(bundle).manifest["graphs"]
    assert (graphs["capacity"], graphs["prefill_gears"]) == (512, [128, 512])
    for prompt in _prompts("wide-cache", checkpoint, graphs["prefill_gears"][0]):
        want = _generate(["--checkpoint", str(checkpoint)], prompt, "1.0", capsys, 12)["token_ids"]
        got = _generate(["--bundle", str(bundle), "--engine", "mindspore"], prompt, "1.0", capsys, 12)["token_ids"]
        assert got == want, (prompt[:16], got, want)


@pytest.mark.parametrize("quant", ["fp32", "fp16", "int8"])
def test_stored_weights_within_the_export_thresholds(bundles, quant):
    """Logits along the reference's greedy path within the export's thresholds for the bundle's precision: fp16
    weights computed in fp32; an int8 bundle's weights as int8 codes widened a block of rows at a time."""
    engine = Bundle.open(bundles[quant]).engine(kind="mindspore")
    reference = ReferenceEngine(ReferenceModel.from_checkpoint(Checkpoint(TINY)))
    metrics = compare_engines(engine, reference, ChatGLMTokenizer.from_dir(TINY), VERIFY_PROMPTS[:2], 6)
    limits = THRESHOLDS[quant]
    assert metrics["max_abs_diff"] <= limits.get("max_abs_diff", np.inf), metrics
    assert metrics["min_cosine"] >= limits.get("min_cosine", -1.0), metrics
    assert metrics["agreement"] >= limits["agreement"], metrics
    state, config = engine.runner.state, Bundle.open(bundles[quant]).config
    if quant == "int8":  # every matrix as int8 codes with one scale per row; the tied table held once
        assert len(state.blocks) == 2 + 4 * config.num_layers and set(state.kinds.values()) == {"int8"}
        head = [(state.weights[codes], state.scales[scales]) for codes, scales in state.blocks[LM_HEAD]]
        assert {str(codes.dtype) for codes, _ in head} == {"Int8"}, head
        assert sum(codes.shape[0] for codes, _ in head) == sum(scales.shape[0] for _, scales in head) == config.vocab_size
        assert state.blocks[EMBEDDING] == state.blocks[LM_HEAD]
    else:
        assert str(state.weights[state.index[LM_HEAD]].dtype) == "Float32" and len(state.scales) == 0


def test_steps_move_only_ids_positions_bias_and_logits_and_write_the_cache_in_place(bundles):
    bundle = Bundle.open(bundles["fp32"])
    engine = bundle.engine(kind="mindspore")
    config, capacity = bundle.config, engine.max_context
    cache = engine.runner.state.cache[0]  # layer 0's keys
    ids = [5, 6, 7, config.gmask_token_id, config.bos_token_id]
    layout = layout_of(ids, config.bos_token_id, config.gmask_token_id, config.mask_token_id)
    sequence = engine.start()
    sequence.prefill(np.array(ids), layout.position_ids(), layout.mask())
    written = cache.asnumpy()[:, : len(ids)].copy()
    assert np.abs(written).sum() > 0
    # ids 4 + positions 8 + bias row 4 x capacity + write slot 4 + last row 4 + logits 4 x vocab, at any length
    expected = 4 + 8 + 4 * capacity + 4 + 4 + 4 * config.vocab_size
    counts = []
    for total in range(len(ids) + 1, len(ids) + 41):
        before = cache.asnumpy()[:, total - 1].copy()
        sequence.step(7, layout.step_position(total))
        counts.append(engine.runner.host_bytes)
        assert engine.runner.state.cache[0] is cache  # the same Parameter, its slot rewritten
        assert not np.array_equal(cache.asnumpy()[:, total - 1], before)
    assert counts[0] == counts[-1] == expected, counts
    np.testing.assert_array_equal(cache.asnumpy()[:, : len(ids)], written)  # earlier slots untouched


def test_weights_that_do_not_fit_the_config_are_refused(bundles, monkeypatch):
    bundle = Bundle.open(bundles["fp32"])
    config = bundle.config
    monkeypatch.setattr(Bundle, "config", property(lambda self: replace(config, num_layers=config.num_layers + 1)))
    with pytest.raises(BundleError, match="decode.onnx lacks transformer.layers.2.input_layernorm.weight or stores it "
                                          "in another shape than the manifest's model config gives; re-export the bundle"):
        read_weights(bundle)
