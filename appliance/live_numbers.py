"""The monitoring table's numbers for a front end's own answers in this run, without the service: what the window's
Live numbers panel shows (the service exports the same indicators at /metrics, through ``prometheus_client``).

Per answer (``AnswerNumbers``, measured in the thread that runs the answer, as the service does): time to the first
shown text, tokens/s, the longest pause between two pieces of shown text and the pauses over ``STALL_S`` (stalls),
repetition rate and topic similarity (``appliance.answer_quality``), safety-rule hits (counted by ``CountingAudit``
as the session records them), and whether the answer failed. Over the run (``RunNumbers``): answers, P50/P99 time to
first token (nearest rank: a time some answer really had), stalls, the share of answers on topic, safety hits, errors.
The process itself (``ProcessMeter``): resident memory and CPU use, as shares of the machine's memory and of the CPUs
this process may run on. ``THRESHOLDS`` are the monitoring table's alert thresholds, the numbers of the Prometheus
alert rules (deploy/prometheus/streamchat-alerts.yml; a test keeps the two equal).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from appliance.answer_quality import repetition_rate, topic_similarity
from appliance.generation import GenerationResult
from appliance.safety import AuditLog, Match
from appliance.session import TurnResult

STALL_S = 0.5  # a pause between tokens a reader notices: twice a ChatGLM-6B decode step on a desktop CPU


@dataclass(frozen=True)
class Threshold:
    """Alert when a value is over ``limit`` (``above``) or under it."""

    limit: float
    above: bool = True

    def breached(self, value: float | None) -> bool:
        return value is not None and (value > self.limit if self.above else value < self.limit)


THRESHOLDS = {
    "ttft_s": Threshold(1.0),  # user experience: time to first token > 1 s
    "pause_s": Threshold(STALL_S),  # user experience: a perceptible stall
    "stall_share": Threshold(0.01),  # over 1% of the pauses are stalls
    "repetition": Threshold(0.15),  # model behaviour: repetition rate > 15%
    "on_topic": Threshold(0.7, above=False),  # model behaviour: topic consistency < 0.7
    "error_rate": Threshold(0.01),  # service quality: error rate > 1%
    "cpu": Threshold(0.85),  # system: CPU > 85%
    "memory": Threshold(0.85),  # system: memory > 85%
}


def tokens_per_second(gen: GenerationResult | None) -> float | None:
    """The decode speed of an answer (prompt processing not counted); None when it generated no token."""
    if gen is None or not gen.token_ids or not gen.decode_ms_per_token:
        return None
    return 1000 / gen.decode_ms_per_token


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (``share`` 0.5 for P50, 0.99 for P99) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


class AnswerClock:
    """The times of one answer's shown text, taken where it is made: started when the message is sent, ticked at
    each piece of text (a piece may carry several tokens, as a service frame does)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.longest_pause_s: float | None = None
        self.pauses = 0
        self.stalls = 0
        self._last: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is None:
            self.first_token_s = now - self.started
        else:
            pause = now - self._last
            self.pauses += 1
            self.stalls += pause > STALL_S
            self.longest_pause_s = max(pause, self.longest_pause_s or 0.0)
        self._last = now


class CountingAudit(AuditLog):
    """The app's audit log (same file, same text option) that also counts every rule hit it records in ``hits``:
    the safety hits a front end shows, counted where the service counts its own."""

    def __init__(self, audit: AuditLog) -> None:
        super().__init__(audit.path, audit.log_text, self._count)
        self.hits = 0

    def _count(self, match: Match, action: str, where: str) -> None:
        self.hits += 1


@dataclass(frozen=True)
class AnswerNumbers:
    ttft_s: float | None  # None: no text was shown (blocked, held back by the filter, stopped before any)
    tokens: int
    tokens_per_s: float | None
    longest_pause_s: float | None  # None: fewer than two pieces of text
    pauses: int
    stalls: int
    repetition: float | None  # None: under 4 tokens
    topic: float | None  # None: the question or the answer has no term
    safety_hits: int
    failed: bool


def measure(question: str, result: TurnResult, clock: AnswerClock, safety_hits: int = 0,
            failed: bool = False) -> AnswerNumbers:
    """The numbers of the answer ``result`` to ``question``, timed by ``clock``."""
    gen = result.generation
    token_ids = gen.token_ids if gen is not None else []
    return AnswerNumbers(ttft_s=clock.first_token_s, tokens=len(token_ids), tokens_per_s=tokens_per_second(gen),
                         longest_pause_s=clock.longest_pause_s, pauses=clock.pauses, stalls=clock.stalls,
                         repetition=repetition_rate(token_ids),
                         topic=topic_similarity(question, result.response),
                         safety_hits=safety_hits, failed=failed)


class RunNumbers:
    """The answers of this run, added as they end, and what the monitoring table watches over them."""

    def __init__(self) -> None:
        self.last: AnswerNumbers | None = None
        self.answers = self.errors = self.safety_hits = self.pauses = self.stalls = 0
        self.scored = self.on_topic = 0  # answers with a topic similarity, and those sharing a term with the question
        self.ttfts: list[float] = []

    def add(self, answer: AnswerNumbers) -> None:
        self.last = answer
        self.answers += 1
        self.errors += answer.failed
        self.safety_hits += answer.safety_hits
        self.pauses += answer.pauses
        self.stalls += answer.stalls
        if answer.topic is not None:
            self.scored += 1
            self.on_topic += answer.topic > 0
        if answer.ttft_s is not None:
            self.ttfts.append(answer.ttft_s)

    def ttft(self, share: float) -> float | None:
        return percentile(self.ttfts, share)

    @property
    def on_topic_share(self) -> float | None:
        return self.on_topic / self.scored if self.scored else None

    @property
    def stall_share(self) -> float | None:
        return self.stalls / self.pauses if self.pauses else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.answers if self.answers else None


@dataclass(frozen=True)
class ProcessUsage:
    rss_bytes: int | None  # None where /proc is not there to tell (not Linux)
    memory_share: float | None  # of the machine's physical memory
    cpu_share: float | None  # of the CPUs this process may run on, since the previous sample; None at the first


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ProcessMeter:
    """This process's memory and CPU use, one sample at a time (CPU: time used by all its threads since the previous
    sample, over the wall time between them, over the usable CPUs)."""

    def __init__(self) -> None:
        self.cpus = _usable_cpus()
        self.memory = _physical_memory()
        self._last: tuple[float, float] | None = None

    def sample(self) -> ProcessUsage:
        times = os.times()
        now, cpu = time.monotonic(), times.user + times.system
        share = None
        if self._last is not None and now > self._last[0]:
            share = (cpu - self._last[1]) / (now - self._last[0]) / self.cpus
        self._last = (now, cpu)
        rss = _rss_bytes()
        return ProcessUsage(rss, rss / self.memory if rss is not None and self.memory else None, share)
