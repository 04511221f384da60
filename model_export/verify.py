"""Run a new bundle beside the numpy reference and decide whether it may be published.

Both engines get the same calls (prefill, then teacher-forced steps on the reference's greedy tokens), so every step
compares logits for the same context: max |diff|, cosine similarity, and whether the greedy choice agrees. Where the
bundle's prompts run on the AVX2 prompt kernel (INT4 cpu bundles on such a CPU), one longer prompt also goes through
every prefill path the bundle's engine has for it (``prefill_paths``: the kernel and the graph's own prefill), which
must agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from appliance.engines import BundleEngine, Engine
from appliance.positions import layout_of
from appliance.tokenizer import ChatGLMTokenizer

VERIFY_PROMPTS = ("你好，请介绍一下你自己。", "What is machine learning? Explain it briefly.",
                  "def add(a, b):\n\treturn a  +  b")

PROMPT_KERNEL_PROMPT = "StreamChat 是一个离线聊天设备。请用三句话介绍一下你自己，并说明如何在没有网络的机器上安装它。"
# Kernel and graph quantize the prompt's activations slightly differently: cosine 1.0 on the golden fixture, 0.99997
# at 8 and 0.99989 at 28 full-width random layers (docs/performance.md); a broken kernel lands far below.
PROMPT_KERNEL_MIN_COSINE = 0.999

# Thresholds by stored weight precision. fp32/fp16 store the checkpoint's values (fp16 checkpoints round-trip
# exactly), so they must match the reference to float rounding and choose the same tokens. Quantized bundles are
# held to bounds measured on the golden fixture and the demo model with margin (docs/export.md): a broken graph
# (wrong layout, wrong scale) gives cosine near 0 and random choices, far below them.
THRESHOLDS = {
    "fp32": {"max_abs_diff": 1e-4, "agreement": 1.0},
    "fp16": {"max_abs_diff": 2e-2, "agreement": 1.0},  # fp16 compute (Ascend graphs) rounds activations
    "int8": {"min_cosine": 0.99, "agreement": 0.75},
    "int4": {"mean_cosine": 0.93, "min_cosine": 0.60, "agreement": 0.40},
}


@dataclass
class VerifyReport:
    quant: str
    prompts: int
    steps: int
    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    agreement: float
    thresholds: dict
    passed: bool
    prompt_kernel_cosine: float | None = None  # None: this bundle's prompts do not run on the kernel here

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.quant}: max|dlogit| {self.max_abs_diff:.2e}, cosine min {self.min_cosine:.5f} mean "
                f"{self.mean_cosine:.5f}, greedy agreement {self.agreement:.0%} over {self.prompts} prompts x "
                f"{self.steps + 1} positions (thresholds {self.thresholds})"
                + ("" if self.prompt_kernel_cosine is None else
                   f"; prompt kernel vs graph prefill cosine {self.prompt_kernel_cosine:.6f} (min {PROMPT_KERNEL_MIN_COSINE})"))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare_engines(candidate: Engine, reference: Engine, tokenizer: ChatGLMTokenizer, prompts: tuple[str, ...],
                    steps: int, on_step: Callable[[], None] = lambda: None) -> dict:
    """Logit agreement of ``candidate`` with ``reference`` along the reference's greedy path."""
    diffs, cosines, agree = [], [], []
    special = tokenizer.special
    for prompt in prompts:
        ids = tokenizer.encode_prompt(prompt)
        layout = layout_of(ids, special.bos, special.gmask, special.mask)
        seqs = candidate.start(), reference.start()
        got, want = (s.prefill(np.array(ids), layout.position_ids(), layout.mask()) for s in seqs)
        total = len(ids)
        for step in range(steps + 1):
            diffs.append(float(np.abs(got - want).max()))
            cosines.append(_cosine(got, want))
            agree.append(int(got.argmax()) == int(want.argmax()))
            on_step()
            if step == steps:
                break
            token = int(want.argmax())
            total += 1
            got, want = (s.step(token, layout.step_position(total)) for s in seqs)
    return {"max_abs_diff": max(diffs), "min_cosine": min(cosines), "mean_cosine": float(np.mean(cosines)),
            "agreement": float(np.mean(agree))}


def prompt_kernel_cosine(engine: BundleEngine, tokenizer: ChatGLMTokenizer) -> float | None:
    """Lowest cosine between a longer prompt's logits through the prefill path the engine chose (the AVX2 kernel for
    INT4 cpu bundles here) and through each of its other paths (the graph's own prefill); None when the engine
    prefills that prompt one way only."""
    ids = np.array(tokenizer.encode_prompt(PROMPT_KERNEL_PROMPT))
    special = tokenizer.special
    layout = layout_of(ids.tolist(), special.bos, special.gmask, special.mask)
    paths = engine.prefill_paths(ids, layout.mask())
    if len(paths) < 2:
        return None
    chosen, *others = (path.start().prefill(ids, layout.position_ids(), layout.mask()) for path in paths.values())
    return min(_cosine(chosen, other) for other in others)


def verify(candidate: BundleEngine, reference: Engine, tokenizer: ChatGLMTokenizer, quant: str, prompts: int = 3,
           steps: int = 8, on_step: Callable[[], None] = lambda: None) -> VerifyReport:
    metrics = compare_engines(candidate, reference, tokenizer, VERIFY_PROMPTS[:prompts], steps, on_step)
    limits = THRESHOLDS[quant]
    kernel_cosine = prompt_kernel_cosine(candidate, tokenizer)
    passed = (metrics["max_abs_diff"] <= limits.get("max_abs_diff", np.inf)
              and metrics["min_cosine"] >= limits.get("min_cosine", -1.0)
              and metrics["mean_cosine"] >= limits.get("mean_cosine", -1.0)
              and metrics["agreement"] >= limits["agreement"]
              and (kernel_cosine is None or kernel_cosine >= PROMPT_KERNEL_MIN_COSINE))
    return VerifyReport(quant=quant, prompts=prompts, steps=steps, thresholds=limits, passed=passed,
                        prompt_kernel_cosine=kernel_cosine, **metrics)
