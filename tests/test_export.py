"""Export the golden checkpoint to cpu bundles and run them through the CLI and the appliance."""

import json
import shutil

import numpy as np
import pytest

from appliance.bundle import FORMAT_VERSION, Bundle
from appliance.engines import warm_up
from appliance.errors import BundleError, EngineError
from appliance.positions import layout_of
from model_export import graph
from model_export.export import ExportError, export_bundle
from model_export.verify import THRESHOLDS, VERIFY_PROMPTS, compare_engines
from streamchat.cli import main
from tests.conftest import GOLDEN, TINY


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("quant", ["fp32", "fp16"])
@pytest.mark.parametrize("rp", ["1.0", "1.2"])
@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=lambda p: p["name"])
def test_fp_bundle_reproduces_fixture(capsys, bundles, prompt, rp, quant, tmp_path):
    argv = ["generate", "--bundle", str(bundles[quant]), "--prompt", prompt["query"], "--greedy",
            "--max-new-tokens", "24", "--repetition-penalty", rp, "--json"]
    if prompt["history"]:
        history = tmp_path / "h.json"
        history.write_text(json.dumps(prompt["history"], ensure_ascii=False), encoding="utf-8")
        argv += ["--history", str(history)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    expected = prompt["greedy"][f"rp{rp}"]
    assert out["prompt_ids"] == prompt["prompt_input_ids"]
    assert out["token_ids"] == expected["new_token_ids"]
    assert out["response"] == expected["response"]
    assert "".join(out["deltas"]) == out["response"]


def test_fp32_logits_match_reference(bundles, reference_engine, tokenizer):
    metrics = compare_engines(Bundle.open(bundles["fp32"]).engine(), reference_engine, tokenizer, VERIFY_PROMPTS, 8)
    assert metrics["max_abs_diff"] <= 1e-4 and metrics["agreement"] == 1.0


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_bundles_agree_within_thresholds(capsys, bundles, reference_engine, tokenizer, quant):
    bundle = Bundle.open(bundles[quant])
    metrics = compare_engines(bundle.engine(), reference_engine, tokenizer, VERIFY_PROMPTS, 8)
    limits = THRESHOLDS[quant]
    assert metrics["min_cosine"] >= limits["min_cosine"] and metrics["agreement"] >= limits["agreement"]
    assert metrics["mean_cosine"] >= limits.get("mean_cosine", -1)
    assert bundle.manifest["verification"]["passed"]
    # and they stream through the CLI
    assert main(["generate", "--bundle", str(bundles[quant]), "--prompt", "你好", "--max-new-tokens", "8",
                 "--seed", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) >= 1 and "".join(out["deltas"]) == out["response"]


def test_int4_linear_weights_are_under_a_third_of_fp16(bundles):
    cfg = Bundle.open(bundles["int4"]).config
    fp16_bytes = sum(o * i for o, i in cfg.linear_shapes().values()) * cfg.num_layers * 2
    assert Bundle.open(bundles["int4"]).manifest["quant"]["linear_bytes"] <= 0.32 * fp16_bytes


@pytest.mark.parametrize("group", [32, 64, 256])
def test_group_sizes_and_ratio(tmp_path, group):
    bundle = Bundle.open(export_bundle(TINY, tmp_path / "b", quant="int4", group_size=group).bundle)
    cfg = bundle.config
    fp16_bytes = sum(o * i for o, i in cfg.linear_shapes().values()) * cfg.num_layers * 2
    assert bundle.manifest["quant"]["linear_bytes"] <= 0.32 * fp16_bytes
    assert bundle.manifest["quant"]["group_size"] == group


def test_manifest_describes_the_bundle(bundles):
    manifest = Bundle.open(bundles["int4"]).manifest
    assert manifest["format"] == "streamchat-bundle" and manifest["format_version"] == FORMAT_VERSION == 3
    assert manifest["quant"]["weights"] == "int4" and manifest["quant"]["embeddings"] == "int8"
    assert manifest["quant"]["lm_head_shared_with_embedding"] is True
    assert manifest["tokenizer"]["num_image_tokens"] == 20000
    assert {f["path"] for f in manifest["files"]} >= {"decoder.onnx", "decoder.onnx.data", "ice_text.model"}
    report = json.loads((bundles["int4"] / "export_report.json").read_text())
    assert 0.05 < report["summary"]["mean"] < 0.2 and len(report["errors"]) == 2 * 4 + 1


def _damaged_copy(src, tmp_path):
    dst = tmp_path / "damaged"
    shutil.copytree(src, dst)
    return dst


def test_flipped_byte_is_named(bundles, tmp_path):
    bundle = _damaged_copy(bundles["int4"], tmp_path)
    data = bytearray((bundle / "decoder.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "decoder.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch in decoder.onnx.data"):
        Bundle.open(bundle)


def test_deleted_file_is_named(bundles, tmp_path, capsys):
    bundle = _damaged_copy(bundles["int4"], tmp_path)
    (bundle / "ice_text.model").unlink()
    assert main(["generate", "--bundle", str(bundle), "--prompt", "hi"]) == 2
    assert "ice_text.model is missing" in capsys.readouterr().err


def test_truncated_graph_is_named(bundles, tmp_path, capsys):
    bundle = _damaged_copy(bundles["fp32"], tmp_path)
    graph = bundle / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    assert main(["verify", str(bundle)]) == 2
    assert "decoder.onnx is 100 bytes" in capsys.readouterr().err


def test_verify_command_rehashes(bundles, tmp_path, capsys):
    bundle = _damaged_copy(bundles["int8"], tmp_path)
    assert main(["verify", str(bundle)]) == 0
    assert "checksums match" in capsys.readouterr().out
    data = bytearray((bundle / "ice_text.model").read_bytes())
    data[100] ^= 1
    (bundle / "ice_text.model").write_bytes(bytes(data))
    assert main(["verify", str(bundle)]) == 2
    assert "checksum mismatch in ice_text.model" in capsys.readouterr().err


def test_foreign_or_future_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a StreamChat bundle"):
        Bundle.open(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "streamchat-bundle", "format_version": 99}')
    with pytest.raises(BundleError, match="format version 99"):
        Bundle.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(BundleError, match="corrupt"):
        Bundle.open(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--target", "gpu"], "unknown target 'gpu'"),
    (["--quant", "int3"], "unknown quantization 'int3'"),
    (["--group-size", "48"], "group size 48"),
])
def test_export_refuses_bad_requests(tmp_path, capsys, argv, message):
    assert main(["export", str(TINY), "--out", str(tmp_path / "b"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_export_refuses_existing_output_and_foreign_config(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    assert main(["export", str(TINY), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    ckpt = tmp_path / "chatglm2"
    shutil.copytree(TINY, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["multi_query_attention"] = True
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "ChatGLM2" in capsys.readouterr().err


def test_force_replaces_only_after_success(tmp_path):
    out = export_bundle(TINY, tmp_path / "b", quant="int8").bundle
    before = json.loads((out / "manifest.json").read_text())
    export_bundle(TINY, out, quant="fp16", force=True)
    assert json.loads((out / "manifest.json").read_text())["quant"]["weights"] == "fp16" != before["quant"]["weights"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no partial or old directories left behind


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    import model_export.export as export_module

    monkeypatch.setattr(export_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(ExportError, match="not enough disk space"):
        export_bundle(TINY, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_publishes_nothing(tmp_path, monkeypatch):
    import model_export.export as export_module

    monkeypatch.setitem(export_module.verify.__globals__["THRESHOLDS"], "int8", {"min_cosine": 1.1, "agreement": 1.0})
    with pytest.raises(ExportError, match="verification failed"):
        export_bundle(TINY, tmp_path / "b", quant="int8")
    assert list(tmp_path.iterdir()) == []


def test_prompt_attention_in_chunks_matches_reference(tmp_path, monkeypatch, reference_engine, tokenizer):
    """A prompt longer than the attention chunk (and not a multiple of it) gives the reference's logits."""
    monkeypatch.setattr(graph, "PROMPT_CHUNK", 16)
    bundle = Bundle.open(export_bundle(TINY, tmp_path / "b", quant="fp32").bundle)
    long_prompt = "你好，请介绍一下你自己。" + "What is machine learning? Explain it briefly. " * 3
    assert len(tokenizer.encode_prompt(long_prompt)) % 16 and len(tokenizer.encode_prompt(long_prompt)) > 3 * 16
    metrics = compare_engines(bundle.engine(), reference_engine, tokenizer, (long_prompt, "你好"), 6)
    assert metrics["max_abs_diff"] <= 1e-4 and metrics["agreement"] == 1.0


def _prefilled(engine, tokenizer, ids):
    """A new sequence on ``engine`` prefilled with ``ids``: (sequence, layout, the prompt's logits)."""
    special = tokenizer.special
    layout = layout_of(ids, special.bos, special.gmask, special.mask)
    seq = engine.start()
    return seq, layout, seq.prefill(np.array(ids), layout.position_ids(), layout.mask())


def test_cache_is_sized_to_the_context_and_full_is_a_clear_error(bundles, tokenizer):
    engine = Bundle.open(bundles["fp32"]).engine(context=40)
    ids = tokenizer.encode_prompt("你好")
    seq, layout, _ = _prefilled(engine, tokenizer, ids)
    assert engine.max_context == 40 and engine.decoder.cache[0].shape == (1, engine.config.num_heads, 40, engine.config.head_dim)
    for total in range(len(ids) + 1, engine.max_context + 1):
        seq.step(5, layout.step_position(total))
    with pytest.raises(EngineError, match="KV cache holds 40 positions and is full"):
        seq.step(5, layout.step_position(engine.max_context + 1))
    with pytest.raises(EngineError, match="prefilled once"):
        seq.prefill(np.array(ids), layout.position_ids(), layout.mask())


def test_starting_a_sequence_retires_the_previous_one(bundles, tokenizer):
    """The engine has one KV cache: an older sequence refuses to run instead of reading the newer one's cache."""
    engine = Bundle.open(bundles["fp32"]).engine()
    ids = tokenizer.encode_prompt("你好")
    first, layout, expected = _prefilled(engine, tokenizer, ids)
    _, _, again = _prefilled(engine, tokenizer, ids)
    with pytest.raises(EngineError, match="retired"):
        first.step(5, layout.step_position(len(ids) + 1))
    np.testing.assert_array_equal(again, expected)


def test_logits_a_step_returned_survive_the_next_step(bundles, tokenizer):
    """The engine writes logits into one buffer of its own; what it returned must not change under the caller."""
    engine = Bundle.open(bundles["fp32"]).engine()
    ids = tokenizer.encode_prompt("你好")
    seq, layout, logits = _prefilled(engine, tokenizer, ids)
    kept = logits.copy()
    following = seq.step(5, layout.step_position(len(ids) + 1))
    assert not np.array_equal(following, kept)
    np.testing.assert_array_equal(logits, kept)


def test_warm_up_leaves_nothing_in_the_cache(bundles, tokenizer):
    """The app warms an engine up right after loading; the first real prompt must see a clean cache."""
    warmed, cold = (Bundle.open(bundles["fp32"]).engine() for _ in range(2))
    warm_up(warmed, tokenizer.special.bos, tokenizer.special.gmask)
    assert warmed.decoder.cache  # the warm-up allocated and wrote the cache the prompt reuses
    ids = tokenizer.encode_prompt("你好")
    (warm_seq, layout, warm_logits), (cold_seq, _, cold_logits) = (_prefilled(e, tokenizer, ids) for e in (warmed, cold))
    np.testing.assert_array_equal(warm_logits, cold_logits)
    step = layout.step_position(len(ids) + 1)
    np.testing.assert_array_equal(warm_seq.step(5, step), cold_seq.step(5, step))


def test_engine_keeps_cache_between_steps(bundles, reference_engine, tokenizer):
    """Decoding with the cache gives the logits of a full forward over the whole sequence."""
    engine = Bundle.open(bundles["fp32"]).engine()
    ids = GOLDEN["decode_steps"]["prompt_input_ids"]
    steps = GOLDEN["decode_steps"]["steps"]
    seq, layout, _ = _prefilled(engine, tokenizer, ids)
    total = len(ids)
    for step in steps[1:]:
        total += 1
        logits = seq.step(step["input_ids_fed"][0], layout.step_position(total))
        values = step["logits"]["text_rows"]["values"]
        np.testing.assert_allclose(logits[20000:], values, atol=1e-4, rtol=0)
