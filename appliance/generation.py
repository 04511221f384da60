"""The streaming generator: prefill, then one token at a time on an engine's KV cache, sampled through a pipeline of
small score processors.

``PIPELINE`` lists the processors in the order ``model.chat`` gets from transformers: repetition penalty (over prompt
and output ids), the invalid-score guard THUDM appends, then the warpers temperature, top-k, top-p (which greedy
decoding skips). Each processor is a dataclass whose fields are the ``GenerationConfig`` settings it reads, so the
pipeline is built from a config by name; a new sampling knob is a setting in ``appliance.settings.SCHEMA`` plus a
processor here. Generation stops on ``<eop>``, ``max_new_tokens``, a full context, or a cancel event checked between
tokens.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from appliance.engines import Engine
from appliance.errors import PromptError
from appliance.positions import layout_of
from appliance.settings import GenerationSettings, section, section_class
from appliance.textstream import TextStream
from appliance.tokenizer import ChatGLMTokenizer


@dataclass(frozen=True)
class GenerationConfig(section_class("generation", frozen=True)):
    """One answer's sampling: the schema's generation settings (THUDM's top_p 0.7 and temperature 0.95, HF's top_k 50,
    the appliance's repetition penalty, within the schema's limits), plus the choices of a single run."""

    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        for setting in section("generation"):
            setting.check(getattr(self, setting.name), setting.name)

    @classmethod
    def from_settings(cls, settings: GenerationSettings, greedy: bool = False, seed: int | None = None) -> GenerationConfig:
        return cls(**dataclasses.asdict(settings), greedy=greedy, seed=seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Processor(Protocol):
    """Takes the scores of the next token (float32, the pipeline's own copy, which it may change in place) and the
    ids seen so far (a boolean mask over the vocabulary); returns the scores to use next."""

    warper: ClassVar[bool]  # only for sampling: greedy decoding skips it

    def __call__(self, scores: np.ndarray, seen: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class RepetitionPenalty:
    """HF's rule: a seen id's score is divided by the penalty when positive, multiplied when negative."""

    repetition_penalty: float
    warper: ClassVar[bool] = False

    def __call__(self, scores: np.ndarray, seen: np.ndarray) -> np.ndarray:
        penalty = self.repetition_penalty
        if penalty != 1.0:
            ids = np.flatnonzero(seen)
            picked = scores[ids]
            scores[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
        return scores


@dataclass(frozen=True)
class InvalidScoreGuard:
    """THUDM's InvalidScoreLogitsProcessor: NaN/inf anywhere -> all zeros with id 5 at 5e4."""

    warper: ClassVar[bool] = False

    def __call__(self, scores: np.ndarray, seen: np.ndarray) -> np.ndarray:
        if np.isfinite(scores).all():
            return scores
        out = np.zeros_like(scores)
        out[5] = 5e4
        return out


@dataclass(frozen=True)
class Temperature:
    temperature: float
    warper: ClassVar[bool] = True

    def __call__(self, scores: np.ndarray, seen: np.ndarray) -> np.ndarray:
        scores /= np.float32(self.temperature)
        return scores


@dataclass(frozen=True)
class TopK:
    """Keeps the k best scores (and any tied with the k-th); 0 keeps all."""

    top_k: int
    warper: ClassVar[bool] = True

    def __call__(self, scores: np.ndarray, seen: np.ndarray) -> np.ndarray:
        if 0 < self.top_k < scores.size:
            np.copyto(scores, -np.inf, where=scores < np.partition(scores, -self.top_k)[-self.top_k])
        return scores


@dataclass(frozen=True)
class TopP:
    """HF's nucleus: keeps the smallest set of tokens whose probability mass exceeds top_p.

    Only the tokens still alive are sorted (50 after top-k, not 130528), which keeps sampling far below 1% of a step.
    """

    top_p: float
    warper: ClassVar[bool] = True

    def __call__(self, scores: np.ndarray, seen: np.ndarray) -> np.ndarray:
        if self.top_p < 1.0:
            live = np.flatnonzero(np.isfinite(scores))
            order = live[np.argsort(scores[live], kind="stable")]
            probs = np.exp(scores[order] - scores[order[-1]])
            remove = np.cumsum(probs / probs.sum()) <= 1 - self.top_p
            remove[-1] = False
            scores[order[remove]] = -np.inf
        return scores


PIPELINE: tuple[type, ...] = (RepetitionPenalty, InvalidScoreGuard, Temperature, TopK, TopP)  # HF's order


def processors(config: GenerationConfig) -> tuple[Processor, ...]:
    """The pipeline for ``config``: each processor built from the config fields named like its own fields."""
    return tuple(kind(**{f.name: getattr(config, f.name) for f in dataclasses.fields(kind)})
                 for kind in PIPELINE if not (config.greedy and kind.warper))


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated, <eop> included when produced
    response: str = ""
    deltas: list[str] = field(default_factory=list)
    stopped: str = ""  # eos | max_new_tokens | context | cancelled
    prefill_ms: float = 0.0
    decode_ms_per_token: float = 0.0

    def timings(self) -> dict:
        """What the history stores with an answer and ``generate --json`` prints."""
        return {"prefill_ms": round(self.prefill_ms, 3), "decode_ms_per_token": round(self.decode_ms_per_token, 3),
                "tokens": len(self.token_ids)}


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
        pipeline = processors(config)
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
            token = self._choose(logits, seen, pipeline, config.greedy, rng)
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

    @staticmethod
    def _choose(logits: np.ndarray, seen: np.ndarray, pipeline: tuple[Processor, ...], greedy: bool,
                rng: np.random.Generator) -> int:
        scores = logits.astype(np.float32)  # a copy: the processors work in place
        for process in pipeline:
            scores = process(scores, seen)
        if greedy:
            return int(np.argmax(scores))
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
