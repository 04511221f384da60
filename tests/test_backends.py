"""Every backend of the one ChatGLM-6B definition against the numpy reference, on two shape sets.

Shape sets: the golden fixture (hidden 64, 4 heads of 16), and a synthetic checkpoint whose head size is not a power
of two (hidden 96, 4 heads of 24, 3 layers, context 160: the Ascend cache holds 160 positions and its prefill gears are
64 and 160, so short prompts run in a gear smaller than the capacity and long ones in the capacity's gear).

Backends: the numpy reference, the cpu ONNX graph (fp32, and INT4 whose prompts run through the graph's own prefill),
the INT4 prompt path (AVX2 kernel), and the static Ascend graphs on onnxruntime (fp32 compute; fp32 and INT4 weights).
fp32 backends must match the reference to float rounding. Quantized ones are compared with the reference run on the
very weights they hold (dequantized with the bundle's own group sizes), so what is left is activation rounding, and a
wrong rotary, scale or nibble order shows up as a large error, not hidden in quantization noise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from appliance.bundle import Bundle
from appliance.engines.int4_prefill import MIN_PROMPT, Int4Prefill
from appliance.kernels.prompt_kernels import load
from appliance.model.quantize import BITS, effective_group, quantize_blockwise
from appliance.model.weights import EMBEDDING, LINEARS, LM_HEAD, layer_prefix
from appliance.positions import layout_of
from appliance.tokenizer import ChatGLMTokenizer
from model_export.checkpoint import Checkpoint
from model_export.export import default_embeddings, export_bundle
from model_export.reference import ReferenceEngine, ReferenceModel
from model_export.synthetic import write_checkpoint
from model_export.verify import VERIFY_PROMPTS, compare_engines
from tests.conftest import GOLDEN, TINY

ROOT = Path(__file__).resolve().parent.parent
ODD_WIDTHS = {"hidden_size": 96, "num_attention_heads": 4, "inner_hidden_size": 384, "max_sequence_length": 160}
LONG_PROMPT = "StreamChat 是一个离线聊天设备。请用三句话介绍一下你自己，并说明如何在没有网络的机器上安装它。" * 2
PROMPTS = (*VERIFY_PROMPTS, LONG_PROMPT)
STEPS = 6

# fp32 graphs compute what the reference computes, in another order.
EXACT = {"max_abs_diff": 1e-4, "agreement": 1.0}
# Quantized graphs against the reference on the same quantized weights: MatMulNBits and the prompt kernel round the
# activations to int8 per group (measured on these two sets: cosine >= 0.99984, greedy agreement >= 95%; keys and values
# of the prompt kernel cosine >= 0.99995); a wrong scale, rotary row or nibble order gives cosines far below.
SAME_WEIGHTS_INT8_ACTIVATIONS = {"min_cosine": 0.999, "agreement": 0.85}


@dataclass
class ShapeSet:
    name: str
    checkpoint: Path
    reference: ReferenceModel
    tokenizer: ChatGLMTokenizer
    bundles: Path

    def bundle(self, target: str, quant: str, group_size: int = 128) -> Path:
        out = self.bundles / f"{target}-{quant}-{group_size}"
        if not out.exists():
            export_bundle(self.checkpoint, out, target=target, quant=quant, group_size=group_size)
        return out

    def quantized_reference(self, target: str, quant: str, group_size: int) -> ReferenceEngine:
        """The reference on the weights a ``target``/``quant`` bundle stores: linears at ``quant``, the (tied) head and
        embedding as that target stores them, Ascend scales rounded to fp16."""
        ckpt = Checkpoint(self.checkpoint)
        assert ckpt.lm_head_is_tied()
        weights = {name: np.ascontiguousarray(ckpt.tensor(name)) for name in ckpt.names()}

        def stored(weight: np.ndarray, precision: str) -> np.ndarray:
            if precision == "fp16":
                return weight.astype(np.float16).astype(np.float32)
            q = quantize_blockwise(weight, BITS[precision], effective_group(weight.shape[1], group_size))
            if target != "cpu":
                q.scales = q.scales.astype(np.float16).astype(np.float32)
            return q.dequantize()

        for n in range(self.reference.config.num_layers):
            for linear in LINEARS:
                name = layer_prefix(n) + linear + ".weight"
                weights[name] = stored(weights[name], quant)
        weights[LM_HEAD] = weights[EMBEDDING] = stored(weights[LM_HEAD], default_embeddings(quant, target))
        return ReferenceEngine(ReferenceModel(self.reference.config, weights))


@pytest.fixture(scope="module", params=["golden", "head_dim_24"])
def shapes(request, tmp_path_factory) -> ShapeSet:
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = TINY if request.param == "golden" else \
        write_checkpoint(root / "checkpoint", layers=3, seed=7, widths=ODD_WIDTHS)
    ckpt = Checkpoint(checkpoint)
    return ShapeSet(request.param, checkpoint, ReferenceModel.from_checkpoint(ckpt), ChatGLMTokenizer.from_dir(checkpoint),
                    root / "bundles")


def _agrees(metrics: dict, limits: dict) -> bool:
    return (metrics["max_abs_diff"] <= limits.get("max_abs_diff", np.inf)
            and metrics["min_cosine"] >= limits.get("min_cosine", -1.0) and metrics["agreement"] >= limits["agreement"])


def test_shape_sets_are_what_they_claim(shapes):
    cfg = shapes.reference.config
    if shapes.name == "golden":
        prompt = GOLDEN["prompts"][0]  # the reference itself is the golden record's
        ids = prompt["prompt_input_ids"]
        layout = layout_of(ids, cfg.bos_token_id, cfg.gmask_token_id, cfg.mask_token_id)
        logits = ReferenceEngine(shapes.reference).start().prefill(np.array(ids), layout.position_ids(), layout.mask())
        top = prompt["last_logits"]["top20"]
        np.testing.assert_allclose(logits[top["ids"]], top["values"], atol=1e-4, rtol=0)
    else:
        assert cfg.head_dim == 24 and cfg.head_dim & (cfg.head_dim - 1)  # not a power of two
        gears = Bundle.open(shapes.bundle("ascend-310b", "fp32")).manifest["graphs"]
        lengths = [len(shapes.tokenizer.encode_prompt(p)) for p in PROMPTS]
        assert gears["capacity"] == 160 and gears["prefill_gears"] == [64, 160]
        assert min(lengths) <= 64 < max(lengths) <= 160  # both gears run, one smaller than the capacity


def test_cpu_graph_fp32(shapes):
    engine = Bundle.open(shapes.bundle("cpu", "fp32")).engine(kernels=False)
    metrics = compare_engines(engine, ReferenceEngine(shapes.reference), shapes.tokenizer, PROMPTS, STEPS)
    assert _agrees(metrics, EXACT), metrics


@pytest.mark.parametrize("group_size", [128, 32])
def test_cpu_graph_int4(shapes, group_size):
    """Group 128 leaves hidden 96 with a zero-padded last group; 32 divides every width."""
    engine = Bundle.open(shapes.bundle("cpu", "int4", group_size)).engine(kernels=False)
    reference = shapes.quantized_reference("cpu", "int4", group_size)
    metrics = compare_engines(engine, reference, shapes.tokenizer, PROMPTS, STEPS)
    assert _agrees(metrics, SAME_WEIGHTS_INT8_ACTIVATIONS), metrics


@pytest.mark.skipif(load() is None, reason="INT4 prompt kernel not built or no AVX2/FMA on this CPU")
def test_int4_prompt_path(shapes):
    """Group 32 (every width a whole number of groups, as the kernel needs). The prompt rows' keys and values written
    by the kernel path, layer by layer, and its logits are the reference's; the engine's (kernel prefill, then graph
    decode) agree like the graph's own."""
    bundle = shapes.bundle("cpu", "int4", 32)
    cfg = shapes.reference.config
    prefill = Int4Prefill.open(bundle / "decoder.onnx", cfg, threads=2)
    assert prefill is not None, "the kernel declined this bundle"
    reference = shapes.quantized_reference("cpu", "int4", 32)
    special = shapes.tokenizer.special
    kernel_prompts = [text for text in PROMPTS if len(shapes.tokenizer.encode_prompt(text)) >= MIN_PROMPT]
    assert len(kernel_prompts) >= 2
    for text in kernel_prompts:
        ids = np.array(shapes.tokenizer.encode_prompt(text))
        layout = layout_of(list(ids), special.bos, special.gmask, special.mask)
        mask, positions = layout.mask(), layout.position_ids()
        assert Int4Prefill.takes(ids)
        cache = [np.zeros((1, cfg.num_heads, len(ids), cfg.head_dim), np.float32) for _ in range(2 * cfg.num_layers)]
        logits = prefill.run(ids, positions, mask, cache)
        want = reference.model.forward(ids[None], positions[None], mask[None, None])
        for n, (keys, values) in enumerate(want.past):
            for got, expected in ((cache[2 * n], keys), (cache[2 * n + 1], values)):
                got, expected = got[0].transpose(1, 0, 2), expected[:, 0]  # [rows, heads, hd]
                cosine = float(got.ravel() @ expected.ravel() / np.linalg.norm(got) / np.linalg.norm(expected))
                assert cosine > 0.9999, (text[:12], n, cosine)
        expected = want.logits[0]
        cosine = float(logits @ expected / np.linalg.norm(logits) / np.linalg.norm(expected))
        assert cosine > 0.9999 and np.argmax(logits) == np.argmax(expected), (text[:12], cosine)
    engine = Bundle.open(bundle).engine(kernels=True)
    metrics = compare_engines(engine, reference, shapes.tokenizer, kernel_prompts, STEPS)
    assert _agrees(metrics, SAME_WEIGHTS_INT8_ACTIVATIONS), metrics


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_ascend_static_graphs_fp32_compute(shapes, quant):
    """The static graphs (fp32 check graphs; an int8 bundle's hold the fp16 weights its converter quantizes) through
    onnxruntime."""
    engine = Bundle.open(shapes.bundle("ascend-310b", quant)).engine(kind="onnxruntime")
    reference = ReferenceEngine(shapes.reference) if quant == "fp32" else \
        shapes.quantized_reference("ascend-310b", "fp16", 128)
    metrics = compare_engines(engine, reference, shapes.tokenizer, PROMPTS, STEPS)
    assert _agrees(metrics, EXACT), metrics  # fp32 compute on exactly the stored weights


# Each piece of ChatGLM's semantics, as any copy of it would have to be written, and the one file that may hold it.
ONE_PLACE = {
    "tanh GELU": (r"0\.044715", "appliance/model/definition.py"),
    "residual alpha": (r"2 \* 28|sqrt\(56\)|7\.483|\bALPHA\s*=", "appliance/model/definition.py"),
    "2D rotary split": (r"\[\.\.\., *:? *(rd|half|rotary_dim)\b|\[:, *[01]\]|rotary_dim *// *2|(cat|concatenate|Concat)\("
                        r"\[ *-|outputs=4|split\(x, 4\)", "appliance/model/definition.py"),
    "nibble unpacking": (r">> *4\b|& *(0x0[fF]|15)\b|BitShift|[Ff]loor\W.*\b16\b|\b[Dd]iv\W.*\b16\b",
                         "appliance/model/weights.py"),
    "attention scaling": (r"sqrt\((hd|head_dim|cfg\.head_dim|config\.head_dim)\)|layer \+ 1\)? *\*|\* *\(layer \+ 1\)",
                          "appliance/model/definition.py"),
}
# The C kernel (appliance/kernels/prompt_kernels.c) necessarily has its own GELU and nibble code; test_prompt_kernels.py
# checks its GELU against the definition's and its products against the numpy unpacking.


def _non_test_sources() -> list[Path]:
    return sorted(p for folder in ("appliance", "model_export", "streamchat", "ui", "bench", "tools")
                  for p in (ROOT / folder).rglob("*.py") if p.is_file())


@pytest.mark.parametrize("piece", ONE_PLACE)
def test_each_piece_of_the_model_is_written_once(piece):
    pattern, home = ONE_PLACE[piece]
    found = {p.relative_to(ROOT).as_posix() for p in _non_test_sources()
             if re.search(pattern, p.read_text(encoding="utf-8"))}
    assert found == {home}, f"{piece} is written in {sorted(found)}"
