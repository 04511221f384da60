"""The step server keeps the KV cache in MindSpore Lite tensors (``lite_server.Server.run``): a decode step copies
its small inputs in, its logits out and the cache rows it wrote, the same bytes at any context length, and its logits
stay those of onnxruntime on the same graphs over a long decode.

The fixture's Ascend bundles (fp32 check graphs, Lite 2.0.0's CPU backend) through the real step server; needs a Lite
Python (STREAMCHAT_LITE_PYTHON). The greedy ids of ``generate --engine mindspore-lite`` are checked against the
reference in tests/test_ascend.py and tests/test_ascend_shapes.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from appliance.bundle import Bundle
from appliance.engines.memory import kv_cache_bytes
from appliance.errors import EngineError
from appliance.positions import PromptLayout, layout_of
from model_export.export import export_bundle
from tests.conftest import TINY

LITE = os.environ.get("STREAMCHAT_LITE_PYTHON")
pytestmark = pytest.mark.skipif(not LITE, reason="no MindSpore Lite Python (set STREAMCHAT_LITE_PYTHON; .ci/run does)")
TARGETS = ("ascend-310b", "ascend-910b")
FP32 = 4
STEPS = 8
LONG_STEPS = 100
# Lite's CPU kernels against onnxruntime on the same fp32 graphs (measured on the fixture: 2.1e-4 over 100 steps);
# a cache row lost or overwritten moves logits by whole units
LITE_VS_ORT = 1e-3


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Bundle]:
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("bundles")
    return {t: Bundle.open(export_bundle(TINY, root / t, target=t, quant="fp32").bundle) for t in TARGETS}


@pytest.fixture(scope="module")
def engines(bundles):
    opened = {t: b.engine(kind="mindspore-lite") for t, b in bundles.items()}
    yield opened
    for engine in opened.values():
        engine.runner.close()


def prompt(bundle: Bundle, length: int, seed: int) -> tuple[list[int], PromptLayout]:
    """Made-up ids ending ``[gMASK] <sop>``, ``length`` long, and their layout."""
    special = bundle.tokenizer().special
    ids = [int(i) for i in np.random.default_rng(seed).integers(100, 20000, length - 2)] + [special.gmask, special.bos]
    return ids, layout_of(ids, special.bos, special.gmask, special.mask)


def decode(engine, bundle: Bundle, length: int, steps: int) -> tuple[int, list[int], list[np.ndarray]]:
    """Prefill a ``length``-token prompt and take ``steps`` greedy steps: the prefill's host bytes, each step's,
    and every logits row."""
    ids, layout = prompt(bundle, length, seed=length)
    sequence = engine.start()
    logits = [sequence.prefill(np.array(ids), layout.position_ids(), layout.mask())]
    prefill_bytes, step_bytes = engine.runner.host_bytes, []
    for n in range(steps):
        logits.append(sequence.step(int(logits[-1].argmax()), layout.step_position(length + n + 1)))
        step_bytes.append(engine.runner.host_bytes)
    return prefill_bytes, step_bytes, logits


@pytest.mark.parametrize("target", TARGETS)
def test_a_decode_step_copies_the_same_bytes_at_any_context_length(bundles, engines, target):
    bundle, engine = bundles[target], engines[target]
    cfg, capacity = bundle.config, engine.max_context
    gears = engine.gears
    short, long = 12, gears[0] + 20  # two prefill gears, contexts 12.. and gear + 20..
    row = cfg.num_heads * cfg.head_dim * FP32
    inputs = FP32 + 2 * FP32 + 2 * capacity * FP32  # input_ids, position_ids, attention_bias, write_slot
    want = inputs + cfg.vocab_size * FP32 + 2 * cfg.num_layers * row  # + logits + the rows written
    layer_cache = 2 * capacity * row
    assert want < layer_cache, (want, layer_cache)
    for length in (short, long):
        prefill_bytes, step_bytes, _ = decode(engine, bundle, length, STEPS)
        gear = next(g for g in gears if g >= length)
        prefill_inputs = gear * FP32 + 2 * gear * FP32 + gear * gear * FP32 + gear * FP32
        # the prefill hands its whole cache to the decode graph, once per prompt
        assert prefill_bytes == prefill_inputs + cfg.vocab_size * FP32 + kv_cache_bytes(cfg, capacity)
        assert step_bytes == [want] * STEPS, (length, step_bytes)


@pytest.mark.parametrize("target", TARGETS)
def test_lite_follows_onnxruntime_over_a_long_decode(bundles, engines, target):
    """Greedy steps up to most of the cache, the logits of every step beside onnxruntime's on the same token path."""
    bundle, lite = bundles[target], engines[target]
    ort = bundle.engine(kind="onnxruntime")
    length = 12
    ids, layout = prompt(bundle, length, seed=3)
    steps = min(LONG_STEPS, lite.max_context - length)
    sequences = [lite.start(), ort.start()]
    got, want = (s.prefill(np.array(ids), layout.position_ids(), layout.mask()) for s in sequences)
    worst = float(np.abs(got - want).max())
    for n in range(steps):
        token = int(want.argmax())
        got, want = (s.step(token, layout.step_position(length + n + 1)) for s in sequences)
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= LITE_VS_ORT, worst


def test_a_decode_step_needs_a_prefill_first(bundles, engines):
    bundle, engine = bundles["ascend-910b"], engines["ascend-910b"]
    decode(engine, bundle, 12, 1)
    engine.runner.reset()
    layers = bundle.config.num_layers
    with pytest.raises(EngineError, match=rf"^MindSpore Lite: ValueError: graph decode takes {2 * layers} past_\* inputs "
                                          r"and 0 presents are kept \(run a prefill graph first"):
        engine.runner.run("decode", step_inputs(engine.max_context, batch=1))


def test_a_decode_step_of_another_batch_than_the_cache_is_refused(bundles, engines):
    bundle, engine = bundles["ascend-910b"], engines["ascend-910b"]
    decode(engine, bundle, 12, 1)
    with pytest.raises(EngineError, match=r"^MindSpore Lite: ValueError: input input_ids of graph decode has shape "
                                          r"\[2, 1\] where the kept cache takes \[1, 1\]$"):
        engine.runner.run("decode", step_inputs(engine.max_context, batch=2))
    _, step_bytes, _ = decode(engine, bundle, 12, 2)  # the server goes on
    assert len(step_bytes) == 2


def step_inputs(capacity: int, batch: int) -> dict[str, np.ndarray]:
    write = np.zeros((batch, 1, capacity, 1), np.float32)
    write[:, 0, 12, 0] = 1.0
    return {"input_ids": np.full((batch, 1), 5, np.int32), "position_ids": np.zeros((batch, 2, 1), np.int32),
            "attention_bias": np.zeros((batch, 1, 1, capacity), np.float32), "write_slot": write}

