"""The streaming generator: prefill, then one token at a time on an engine's KV cache, with HF's logits processors.

Processor order is the one ``model.chat`` gets from transformers: repetition penalty (over prompt and output ids), the
invalid-score guard THUDM appends, then the warpers temperature, top-k, top-p. Stops on ``<eop>``, ``max_new_tokens``, a
full context, or a cancel event checked between tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from appliance.engines import Engine
from appliance.errors import PromptError
from appliance.positions import layout_of
from appliance.textstream import TextStream
from appliance.tokenizer import ChatGLMTokenizer


@dataclass(frozen=True)
class GenerationConfig:
    """THUDM's sampling defaults (top_p 0.7, temperature 0.95, HF's top_k 50) with the appliance's repetition penalty."""

    max_new_tokens: int = 512
    greedy: bool = False
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    repetition_penalty: float = 1.2
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = {"max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature > 0,
                  "top_p": 0 < self.top_p <= 1, "top_k": self.top_k >= 0, "repetition_penalty": self.repetition_penalty > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise PromptError(f"invalid generation setting {bad[0]}={getattr(self, bad[0])!r} (max_new_tokens >= 1, "
                              "temperature > 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0)")

    def to_dict(self) -> dict:
        return asdict(self)


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF's rule: a seen id's score is divided by the penalty when positive, multiplied when negative."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    scores = out[seen]
    out[seen] = np.where(scores < 0, scores * penalty, scores / penalty)
    return out


def guard_invalid_scores(logits: np.ndarray) -> np.ndarray:
    """THUDM's InvalidScoreLogitsProcessor: NaN/inf anywhere -> all zeros with id 5 at 5e4."""
    if np.isfinite(logits).all():
        return logits
    out = np.zeros_like(logits)
    out[5] = 5e4
    return out


def warp(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature, then top-k (ties kept), then top-p (HF keeps the smallest set whose mass exceeds top_p).

    Only the tokens still alive are sorted (50 after top-k, not 130528), which keeps sampling far below 1% of a step.
    """
    out = logits / np.float32(temperature)
    if 0 < top_k < out.size:
        kth = np.partition(out, -top_k)[-top_k]
        out = np.where(out < kth, -np.inf, out)
    if top_p < 1.0:
        live = np.flatnonzero(np.isfinite(out))
        order = live[np.argsort(out[live], kind="stable")]
        probs = np.exp(out[order] - out[order[-1]])
        cumulative = np.cumsum(probs / probs.sum())
        remove = cumulative <= 1 - top_p
        remove[-1] = False
        out[order[remove]] = -np.inf
    return out


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated, <eop> included when produced
    response: str = ""
    deltas: list[str] = field(default_factory=list)
    stopped: str = ""  # eos | max_new_tokens | context | cancelled
    prefill_ms: float = 0.0
    decode_ms_per_token: float = 0.0

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "response": self.response,
                "deltas": self.deltas, "stopped": self.stopped,
                "timings": {"prefill_ms": round(self.prefill_ms, 3),
                            "decode_ms_per_token": round(self.decode_ms_per_token, 3)}}


class StreamGenerator:
    """Streams text deltas from an engine; one instance per loaded model, one ``stream`` call per answer."""

    def __init__(self, engine: Engine, tokenizer: ChatGLMTokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer

    def stream(self, prompt_ids: list[int], config: GenerationConfig, cancel: threading.Event | None = None,
               result: GenerationResult | None = None) -> Iterator[str]:
        """Yield non-empty text deltas; ``result`` (pass one in to keep it) is complete when the iterator ends."""
        result = result if result is not None else GenerationResult(prompt_ids=list(prompt_ids))
        special = self.tokenizer.special
        if len(prompt_ids) >= self.engine.max_context:
            raise PromptError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                              f"{self.engine.max_context}: shorten it")
        layout = layout_of(list(prompt_ids), special.bos, special.gmask, special.mask)
        rng = np.random.default_rng(config.seed)
        text = TextStream(self.tokenizer)
        sequence = self.engine.start()

        t0 = time.perf_counter()
        logits = sequence.prefill(np.asarray(prompt_ids, dtype=np.int64), layout.position_ids(), layout.mask())
        result.prefill_ms = (time.perf_counter() - t0) * 1000
        # the model's vocabulary may be padded past the tokenizer's (real ChatGLM-6B: 130528 rows, 130344 pieces)
        seen = np.zeros(max(self.tokenizer.vocab_size, logits.size), dtype=bool)
        seen[np.asarray(prompt_ids)] = True
        t_decode, steps = time.perf_counter(), 0
        total = len(prompt_ids)
        while True:
            token = self._choose(logits, seen, config, rng)
            result.token_ids.append(token)
            total += 1
            if token == special.eos:
                result.stopped = "eos"
                break
            seen[token] = True
            delta = text.push(token)
            if delta:
                result.deltas.append(delta)
                yield delta
            if len(result.token_ids) >= config.max_new_tokens:
                result.stopped = "max_new_tokens"
                break
            if total >= self.engine.max_context:
                result.stopped = "context"
                break
            if cancel is not None and cancel.is_set():
                result.stopped = "cancelled"
                break
            logits = sequence.step(token, layout.step_position(total))
            steps += 1
        result.decode_ms_per_token = (time.perf_counter() - t_decode) * 1000 / max(steps, 1)
        tail = text.finish()
        if tail:
            result.deltas.append(tail)
            yield tail
        result.response = text.text

    def _choose(self, logits: np.ndarray, seen: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
        scores = apply_repetition_penalty(logits.astype(np.float32), np.flatnonzero(seen),
                                          config.repetition_penalty)
        scores = guard_invalid_scores(scores)
        if config.greedy:
            return int(np.argmax(scores))
        scores = warp(scores, config.temperature, config.top_k, config.top_p)
        live = np.flatnonzero(np.isfinite(scores))
        probs = np.exp(scores[live] - scores[live].max())
        return int(live[rng.choice(live.size, p=probs / probs.sum())])

    def run(self, prompt_ids: list[int], config: GenerationConfig,
            cancel: threading.Event | None = None) -> GenerationResult:
        """Generate to the end and return the result (deltas included)."""
        result = GenerationResult(prompt_ids=list(prompt_ids))
        for _ in self.stream(prompt_ids, config, cancel, result):
            pass
        return result
