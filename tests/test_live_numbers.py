"""appliance.live_numbers, the arithmetic behind the window's Live numbers panel: percentiles, an answer's clock, the
run's aggregates, safety hits counted as the session records them, the process's memory and CPU, and thresholds that
are the alert rules' own."""

import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from appliance import live_numbers
from appliance.answer_quality import repetition_rate, topic_similarity
from appliance.live_numbers import (
    STALL_S,
    THRESHOLDS,
    AnswerClock,
    AnswerNumbers,
    CountingAudit,
    ProcessMeter,
    RunNumbers,
    measure,
    percentile,
)
from appliance.loading import open_bundle
from appliance.safety import AuditLog, RuleSet
from appliance.session import ChatSession
from appliance.settings import Settings

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "streamchat-alerts.yml"


def test_percentiles_are_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([0.3], 0.99) == 0.3
    assert percentile([0.4, 0.1, 0.3, 0.2], 0.5) == 0.2
    values = [float(i) for i in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (50.0, 99.0, 100.0)


def test_the_clock_times_the_first_text_pauses_and_stalls(monkeypatch):
    now = iter([10.0, 10.8, 10.9, 11.6, 11.65, 20.0])  # start, four pieces of text; then a clock that never ticks
    monkeypatch.setattr(live_numbers.time, "perf_counter", lambda: next(now))
    clock = AnswerClock()
    for _ in range(4):
        clock.tick()
    assert clock.first_token_s == pytest.approx(0.8)
    assert clock.longest_pause_s == pytest.approx(0.7) and (clock.pauses, clock.stalls) == (3, 1)
    silent = AnswerClock()  # an answer that showed nothing (refused, or held back by the filter)
    assert (silent.first_token_s, silent.longest_pause_s, silent.pauses, silent.stalls) == (None, None, 0, 0)


def _answer(**values) -> AnswerNumbers:
    fields = dict(ttft_s=None, tokens=0, tokens_per_s=None, longest_pause_s=None, pauses=0, stalls=0, repetition=None,
                  topic=None, safety_hits=0, failed=False)
    return AnswerNumbers(**{**fields, **values})


def test_the_run_adds_up_its_answers():
    run = RunNumbers()
    assert (run.answers, run.ttft(0.99), run.on_topic_share, run.stall_share, run.error_rate) == (0, None, None, None,
                                                                                                  None)
    run.add(_answer(ttft_s=0.2, pauses=10, stalls=1, topic=0.3, safety_hits=2))
    run.add(_answer(ttft_s=1.4, pauses=30, topic=0.0))
    run.add(_answer(safety_hits=1))  # refused before anything was generated
    run.add(_answer(ttft_s=0.5, pauses=2, topic=0.1, failed=True))
    assert run.last == _answer(ttft_s=0.5, pauses=2, topic=0.1, failed=True)
    assert (run.answers, run.errors, run.safety_hits, run.stalls, run.pauses) == (4, 1, 3, 1, 42)
    assert (run.ttft(0.5), run.ttft(0.99)) == (0.5, 1.4)
    assert run.on_topic_share == pytest.approx(2 / 3) and run.stall_share == pytest.approx(1 / 42)
    assert run.error_rate == 0.25
    assert THRESHOLDS["on_topic"].breached(run.on_topic_share) and THRESHOLDS["ttft_s"].breached(run.ttft(0.99))
    assert not THRESHOLDS["ttft_s"].breached(run.ttft(0.5)) and not THRESHOLDS["repetition"].breached(None)


def test_an_answer_is_measured_from_what_the_session_recorded(tiny, tmp_path):
    """A real session on the golden bundle, with a safety list naming a word it writes: the numbers are the session's
    tokens and speed, answer_quality's scores of the stored text, and the audit log's hits."""
    model = open_bundle(tiny)
    settings = Settings()
    settings.generation.top_k, settings.generation.max_new_tokens = 1, 24
    plain = ChatSession(model.engine, model.tokenizer, settings)
    first = "".join(plain.send("你好"))
    word = re.search(r"\w", first).group()
    (tmp_path / "list.txt").write_text(f"{word}\n", encoding="utf-8")
    audit = CountingAudit(AuditLog(tmp_path / "audit.jsonl"))
    session = ChatSession(model.engine, model.tokenizer, settings, rules=RuleSet.load([tmp_path / "list.txt"]),
                          audit=audit)
    clock = AnswerClock()
    for _ in session.send("你好"):
        clock.tick()
    result = session.last
    numbers = measure("你好", result, clock, audit.hits)
    logged = (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    assert numbers.safety_hits == audit.hits == len(logged) > 0 and json.loads(logged[0])["where"] == "output"
    gen = result.generation
    assert numbers.tokens == len(gen.token_ids) and numbers.tokens_per_s == pytest.approx(1000 / gen.decode_ms_per_token)
    assert numbers.repetition == repetition_rate(gen.token_ids)
    assert numbers.topic == topic_similarity("你好", result.response)
    assert 0 < numbers.ttft_s < 60 and numbers.pauses == clock.pauses and not numbers.failed


def test_the_process_meter_reads_this_process():
    meter = ProcessMeter()
    first = meter.sample()
    assert first.cpu_share is None  # no interval yet
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
    assert abs(first.rss_bytes - rss) < 16 << 20
    assert first.memory_share == pytest.approx(first.rss_bytes / (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")))
    assert meter.cpus == len(os.sched_getaffinity(0))
    start, cpu = time.monotonic(), time.process_time()
    while time.process_time() - cpu < 0.3:  # keep one thread busy
        pass
    share = meter.sample().cpu_share
    assert share == pytest.approx((time.process_time() - cpu) / (time.monotonic() - start) / meter.cpus, abs=0.05)


def test_the_thresholds_are_the_alert_rules_thresholds():
    """The panel highlights what the Prometheus rules alert on: the same numbers, stated in both places, kept equal."""
    rules = {rule["alert"]: rule["expr"] for group in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
             for rule in group["rules"]}
    pairs = {"ttft_s": "StreamChatTimeToFirstTokenHigh", "stall_share": "StreamChatStreamStalls",
             "repetition": "StreamChatRepetitionHigh", "on_topic": "StreamChatTopicConsistencyLow",
             "error_rate": "StreamChatErrorRateHigh", "cpu": "StreamChatCpuHigh", "memory": "StreamChatMemoryHigh"}
    for key, alert in pairs.items():
        op, limit = re.search(r"([<>])\s*([\d.]+)\s*$", rules[alert]).groups()
        assert (THRESHOLDS[key].above, THRESHOLDS[key].limit) == (op == ">", float(limit)), key
    assert set(THRESHOLDS) == {*pairs, "pause_s"} and THRESHOLDS["pause_s"].limit == STALL_S
