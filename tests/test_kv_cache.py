"""The cpu bundle's KV cache type: fp16 for every bundle but fp32 ones (graphs.kv_cache), read by GroupQueryAttention
directly; the golden greedy ids kept; the memory estimate in the cache's type; bundles without the field open as fp32."""

import json

import numpy as np
import pytest

from appliance.bundle import MANIFEST, Bundle, write_manifest
from appliance.engines import warm_up
from appliance.engines.memory import kv_cache_bytes
from appliance.errors import BundleError, EngineError
from appliance.model_config import ModelConfig
from appliance.positions import layout_of
from model_export.export import ExportError, export_bundle
from model_export.synthetic import real_config
from model_export.verify import VERIFY_PROMPTS, compare_engines
from tests.conftest import GOLDEN, TINY


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """The golden fixture with fp32 weights under either cache, and INT4 weights under either cache."""
    root = tmp_path_factory.mktemp("kv")
    return {(quant, kv): export_bundle(TINY, root / f"{quant}-{kv}", quant=quant, kv_cache=kv).bundle
            for quant in ("fp32", "int4") for kv in ("fp32", "fp16")}


def _greedy(engine, tokenizer, ids: list[int], tokens: int) -> list[int]:
    special = tokenizer.special
    layout = layout_of(ids, special.bos, special.gmask, special.mask)
    seq = engine.start()
    logits = seq.prefill(np.array(ids), layout.position_ids(), layout.mask())
    out, total = [], len(ids)
    for _ in range(tokens):
        out.append(int(logits.argmax()))
        total += 1
        logits = seq.step(out[-1], layout.step_position(total))
    return out


def test_the_export_default_is_fp16_but_for_fp32_bundles(bundles):
    kinds = {quant: Bundle.open(path).manifest["graphs"]["kv_cache"] for quant, path in bundles.items()}
    assert kinds == {"fp32": "fp32", "fp16": "fp16", "int8": "fp16", "int4": "fp16"}
    engine = Bundle.open(bundles["int4"]).engine(context=64)
    warm_up(engine, 1, 2)
    assert {buffer.dtype for buffer in engine.decoder.cache} == {np.dtype(np.float16)}


def test_the_graph_declares_the_manifests_cache_type(caches):
    import onnx

    for (_, kv), path in caches.items():
        model = onnx.load(str(path / "decoder.onnx"), load_external_data=False)
        types = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
                 if v.name.startswith(("past_", "present_"))}
        assert types == {onnx.TensorProto.FLOAT16 if kv == "fp16" else onnx.TensorProto.FLOAT}


@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=lambda p: p["name"])
def test_an_fp16_cache_keeps_the_golden_greedy_ids(caches, tokenizer, prompt):
    """fp32 weights and an fp16 cache: the fixture's greedy answer exactly, as the fp32 cache gives it."""
    engine = Bundle.open(caches["fp32", "fp16"]).engine()
    expected = prompt["greedy"]["rp1.0"]["new_token_ids"]
    assert _greedy(engine, tokenizer, prompt["prompt_input_ids"], len(expected)) == expected  # up to <eop>, if any


# Measured over 3 prompts x 65 positions: fp32 weights max |dlogit| 0.011, cosine >= 0.9999997, every choice alike;
# INT4 0.35, 0.99966, every choice alike (INT8 0.28, 0.99981, 98%): int8-quantized activations turn the cache's
# rounding into whole quantization steps now and then. A wrong cache (layout, type, scale) lands far below.
AGREEMENT = {"fp32": {"max_abs_diff": 3e-2, "min_cosine": 0.99999, "agreement": 1.0},
             "int4": {"max_abs_diff": 1.0, "min_cosine": 0.999, "agreement": 0.95}}


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_fp16_cache_agrees_with_the_fp32_cache(caches, tokenizer, quant):
    """Teacher-forced along the fp32-cache engine's greedy path, 3 prompts x 65 positions."""
    fp16, fp32 = (Bundle.open(caches[quant, kv]).engine() for kv in ("fp16", "fp32"))
    metrics = compare_engines(fp16, fp32, tokenizer, VERIFY_PROMPTS, 64)
    limits = AGREEMENT[quant]
    assert metrics["agreement"] >= limits["agreement"], metrics
    assert metrics["max_abs_diff"] < limits["max_abs_diff"] and metrics["min_cosine"] > limits["min_cosine"], metrics


def test_verification_holds_an_fp16_cache_to_fp16_thresholds(caches):
    report = Bundle.open(caches["fp32", "fp16"]).manifest["verification"]
    assert report["quant"] == "fp16" and report["passed"] and report["agreement"] == 1.0
    assert Bundle.open(caches["fp32", "fp32"]).manifest["verification"]["quant"] == "fp32"


def test_the_memory_estimate_is_the_cache_allocated(caches):
    for (_, kv), path in caches.items():
        engine = Bundle.open(path).engine(context=128)
        warm_up(engine, 1, 2)
        allocated = sum(buffer.nbytes for buffer in engine.decoder.cache)
        assert allocated == kv_cache_bytes(engine.config, 128, kv) == (32 << 10) * (2 if kv == "fp16" else 4)
    full = ModelConfig.from_dict(real_config(28))
    assert kv_cache_bytes(full, 2048, "fp16") == 28 * 2 * 32 * 2048 * 128 * 2 == kv_cache_bytes(full, 2048) // 2


def _rewrite(path, change) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest["graphs"])
    write_manifest(path, manifest)


def test_a_bundle_without_the_field_opens_with_an_fp32_cache(caches, tokenizer, tmp_path):
    """Bundles exported before graphs.kv_cache existed hold fp32 caches and keep working."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(caches["int4", "fp32"], old)
    _rewrite(old, lambda graphs: graphs.pop("kv_cache"))
    bundle = Bundle.open(old)
    assert "kv_cache" not in bundle.manifest["graphs"]
    engine, same = bundle.engine(), Bundle.open(caches["int4", "fp32"]).engine()
    ids = GOLDEN["prompts"][0]["prompt_input_ids"]
    assert _greedy(engine, tokenizer, ids, 8) == _greedy(same, tokenizer, ids, 8)
    assert {buffer.dtype for buffer in engine.decoder.cache} == {np.dtype(np.float32)}


def test_a_manifest_that_misstates_the_cache_is_refused(caches, tmp_path):
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(caches["int4", "fp32"], wrong)
    _rewrite(wrong, lambda graphs: graphs.update(kv_cache="fp16"))
    with pytest.raises(EngineError, match=r"^decoder\.onnx keeps its KV cache as fp32, its manifest says fp16: "
                                          r"re-export the bundle$"):
        Bundle.open(wrong).engine()
    _rewrite(wrong, lambda graphs: graphs.update(kv_cache="bf16"))
    with pytest.raises(BundleError, match=r"graphs\.kv_cache must be one of fp32, fp16 \(absent: fp32"):
        Bundle.open(wrong)
    _rewrite(wrong, lambda graphs: graphs.update(kv_cache=["fp16"]))
    with pytest.raises(BundleError, match=r"graphs\.kv_cache must be"):
        Bundle.open(wrong)


def test_the_export_refuses_an_unknown_cache_type(tmp_path):
    with pytest.raises(ExportError, match=r"^unknown KV cache type 'int8': choose one of fp32, fp16$"):
        export_bundle(TINY, tmp_path / "b", quant="int4", kv_cache="int8")
    assert not (tmp_path / "b").exists()
