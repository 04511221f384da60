"""Ascend bundles whose prefill gears are smaller than the KV cache capacity, end to end on MindSpore Lite 2.0.0.

Two shape sets: the golden fixture, and a synthetic checkpoint with ``max_sequence_length`` 512 (hidden 96, 4 heads of
24, 3 layers; the widths of tests/test_backends.py): on ascend-310b its capacity is clamped from 1024 to 512 and its
prefill gears are 64/256/512, on ascend-910b (capacity 2048, gears 128/512/2048) they are 128/512. Every prefill graph
but the last writes a prompt shorter than the cache into it, which Lite 2.0.0 must convert with the cache's shape.

Each bundle's fp32 check graphs run through ``generate --engine mindspore-lite`` (the step server, Lite's CPU backend)
and must give the numpy reference's greedy token ids (``generate --checkpoint``), for a short prompt and one longer than
the smallest gear. The synthetic checkpoint's greedy answer is one token repeated, so its logits are compared too: along
the reference's greedy path, to float rounding. Needs a Lite Python (STREAMCHAT_LITE_PYTHON); the shape checks run
everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

from appliance.bundle import Bundle
from appliance.conversion import static_input_shapes
from appliance.tokenizer import ChatGLMTokenizer
from model_export.checkpoint import Checkpoint
from model_export.export import export_bundle
from model_export.reference import ReferenceEngine, ReferenceModel
from model_export.synthetic import write_checkpoint
from model_export.verify import compare_engines
from streamchat.cli import main
from tests.conftest import GOLDEN, TINY
from tests.test_backends import EXACT, LONG_PROMPT, ODD_WIDTHS

LITE = os.environ.get("STREAMCHAT_LITE_PYTHON")
needs_lite = pytest.mark.skipif(not LITE, reason="no MindSpore Lite Python (set STREAMCHAT_LITE_PYTHON; .ci/run does)")
TARGETS = ("ascend-310b", "ascend-910b")
WIDE_CACHE = {**ODD_WIDTHS, "max_sequence_length": 512}
# the shape set's capacity and prefill gears per target (the target's own, clamped to max_sequence_length 512)
WIDE_CACHE_GRAPHS = {"ascend-310b": (512, [64, 256, 512]), "ascend-910b": (512, [128, 512])}
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {"fixture": TINY,
            "wide-cache": write_checkpoint(tmp_path_factory.mktemp("wide") / "checkpoint", layers=3, seed=7,
                                           widths=WIDE_CACHE)}


@pytest.fixture(scope="module")
def bundles(checkpoints, tmp_path_factory) -> dict[tuple[str, str], Path]:
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("bundles")
    return {(name, target): export_bundle(checkpoint, root / f"{name}-{target}", target=target, quant="fp32").bundle
            for name, checkpoint in checkpoints.items() for target in TARGETS}


def _prompts(name: str, checkpoint: Path, smallest_gear: int) -> list[str]:
    """A short prompt and one longer than the smallest prefill gear (checked: the second runs in a larger gear)."""
    long = GOLDEN["prompts"][2]["query"] * 6 if name == "fixture" else LONG_PROMPT * 2
    lengths = [len(ChatGLMTokenizer.from_dir(checkpoint).encode_prompt(p)) for p in (GOLDEN["prompts"][0]["query"], long)]
    assert lengths[0] <= smallest_gear < lengths[1], lengths
    return [GOLDEN["prompts"][0]["query"], long]


def _greedy_ids(source: list[str], prompt: str, capsys) -> list[int]:
    assert main(["generate", *source, "--prompt", prompt, "--greedy", "--max-new-tokens", str(NEW_TOKENS),
                 "--repetition-penalty", "1.0", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)["token_ids"]


@pytest.mark.parametrize("target", TARGETS)
def test_capacity_is_clamped_everywhere_it_is_stated(bundles, target):
    """The manifest, every graph's cache inputs/outputs and every graph's converter input shapes agree on the capacity
    clamped to max_sequence_length (not the target's own)."""
    bundle = Bundle.open(bundles[("wide-cache", target)])
    graphs, cfg = bundle.manifest["graphs"], bundle.config
    capacity, gears = WIDE_CACHE_GRAPHS[target]
    assert (graphs["capacity"], graphs["prefill_gears"]) == (capacity, gears)
    for key, rel in graphs["device"].items():
        gear = int(key.split(":")[1]) if ":" in key else None
        model = onnx.load(str(bundle.path / rel), load_external_data=False)
        dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.input, *model.graph.output]}
        want = static_input_shapes(cfg, capacity, gear, "batch")
        assert {name: dims[name] for name in want} == want
        for n in range(cfg.num_layers):
            assert dims[f"present_key.{n}"] == ["batch", cfg.num_heads, capacity, cfg.head_dim]
        line = (bundle.path / "converter" / f"{Path(rel).stem}.shape").read_text()
        assert line == ";".join(f"{k}:{','.join(map(str, [1, *v[1:]]))}" for k, v in want.items()) + "\n"
        if gear is None:
            assert f"past_key.0:1,{cfg.num_heads},{capacity},{cfg.head_dim}" in line


@needs_lite
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["wide-cache", "fixture"])
def test_lite_reproduces_the_reference_greedy_ids(checkpoints, bundles, capsys, name, target):
    bundle = bundles[(name, target)]
    gears = Bundle.open(bundle).manifest["graphs"]["prefill_gears"]
    assert gears[0] < Bundle.open(bundle).manifest["graphs"]["capacity"]
    for prompt in _prompts(name, checkpoints[name], gears[0]):
        want = _greedy_ids(["--checkpoint", str(checkpoints[name])], prompt, capsys)
        got = _greedy_ids(["--bundle", str(bundle), "--engine", "mindspore-lite"], prompt, capsys)
        assert got == want, (prompt[:16], got, want)


@needs_lite
@pytest.mark.parametrize("target", TARGETS)
def test_lite_logits_match_the_reference(checkpoints, bundles, target):
    checkpoint = checkpoints["wide-cache"]
    engine = Bundle.open(bundles[("wide-cache", target)]).engine(kind="mindspore-lite")
    reference = ReferenceEngine(ReferenceModel.from_checkpoint(Checkpoint(checkpoint)))
    prompts = tuple(_prompts("wide-cache", checkpoint, engine.gears[0]))
    try:
        metrics = compare_engines(engine, reference, ChatGLMTokenizer.from_dir(checkpoint), prompts, 6)
    finally:
        engine.runner.close()
    assert metrics["max_abs_diff"] <= EXACT["max_abs_diff"] and metrics["agreement"] == 1.0, metrics
