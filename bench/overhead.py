"""Generation overhead per token on ChatGLM-6B's vocabulary: logits processors, sampling, text streaming and the
safety filter (default list), with a stand-in engine that returns 130528 random logits instantly.

    python bench/overhead.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from appliance.app import safety_lists
from appliance.generation import GenerationConfig, StreamGenerator
from appliance.safety import RuleSet, StreamFilter
from appliance.tokenizer import ChatGLMTokenizer
from model_export.synthetic import write_checkpoint

VOCAB = 130528
STEPS = 200


class RandomLogits:
    name, max_context = "random", 4096

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.table = [rng.standard_normal(VOCAB).astype(np.float32) * 3 for _ in range(16)]

    def start(self) -> RandomLogits:
        return self

    def prefill(self, ids, positions, mask) -> np.ndarray:
        return self.table[0]

    def step(self, token: int, positions) -> np.ndarray:
        return self.table[token % 16]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:  # a real-layout tokenizer (ids up to 130008)
        ckpt = write_checkpoint(Path(tmp), 1, widths={"hidden_size": 64, "inner_hidden_size": 256,
                                                      "num_attention_heads": 4})
        tokenizer = ChatGLMTokenizer.from_dir(ckpt)
    generator, rules = StreamGenerator(RandomLogits(), tokenizer), RuleSet.load(safety_lists(Path("/nonexistent")))
    print("| generation | ms per token | share of a 250 ms decode step |")
    print("|---|---|---|")
    for name, config in (("greedy, repetition penalty 1.2", GenerationConfig(greedy=True, max_new_tokens=STEPS)),
                         ("sampling (defaults: top-k 50, top-p 0.7, T 0.95)", GenerationConfig(max_new_tokens=STEPS, seed=0)),
                         ("sampling with top-k disabled (top-p over 130528)", GenerationConfig(max_new_tokens=STEPS, seed=0,
                                                                                             top_k=0))):
        start, filt = time.perf_counter(), StreamFilter(rules)
        for delta in generator.stream(tokenizer.encode_prompt("你好"), config):
            filt.push(delta)
        ms = (time.perf_counter() - start) / STEPS * 1000
        print(f"| {name} | {ms:.2f} | {ms / 250:.1%} |")


if __name__ == "__main__":
    main()
