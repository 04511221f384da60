"""``/metrics`` of the real server after real requests: every indicator of the monitoring table shows values that match
what happened (tokens, answers, replica busy time, repetition rate and topic similarity of known answers, safety-filter
hits at both stages, stalls), and the request log writes message text only with ``--log-messages``. The answer-quality
measures themselves (appliance/answer_quality.py) are checked on hand-made input."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from appliance.answer_quality import REPETITION_N, repetition_rate, terms, topic_similarity
from appliance.device_usage import DeviceUsage
from appliance.service.metrics import AcceleratorCollector
from appliance.service.request_log import request_line
from tests.test_service import JSON, LONG, PROMPT, Server, _answer, generate

OPERATOR_LIST = "离线聊天\n"  # a word of the demo's greedy answer to PROMPT: the output filter masks it
REPEATING = "How do I change the temperature?"  # asked with a repetition penalty of 0.5, which rewards repeats:
# the greedy answer loops on one token until max_new_tokens
GREETING = "你好"


def scrape(srv: Server) -> dict[tuple[str, frozenset], float]:
    """/metrics as {(sample name, labels): value}."""
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, frozenset(labels.items()))]


# ---- the measures, on hand-made input ----------------------------------------------------------------------------

def test_repetition_rate_is_the_share_of_repeated_token_ngrams():
    assert REPETITION_N == 4
    assert repetition_rate([1, 2, 3, 4] * 5) == pytest.approx(1 - 4 / 17)  # 17 4-grams, 4 distinct
    assert repetition_rate(list(range(30))) == 0.0
    assert repetition_rate([7] * 10) == pytest.approx(1 - 1 / 7)
    assert repetition_rate([1, 2, 3]) is None and repetition_rate([]) is None
    assert repetition_rate([1, 2, 3, 4]) == 0.0


def test_topic_similarity_is_a_cosine_of_words_and_chinese_character_pairs():
    assert terms("StreamChat 是什么？ ＳｔｒｅａｍＣｈａｔ!") == {"streamchat": 2, "是什": 1, "什么": 1}
    assert terms("天") == {"天": 1} and terms("a_b 3.5") == {"a": 1, "b": 1, "3": 1, "5": 1}
    assert topic_similarity("需要联网吗", "不需要联网") == pytest.approx(3 / 4)  # 需要 要联 联网 of 4 pairs each
    product = topic_similarity("StreamChat 是什么？", "StreamChat 是一个离线聊天软件")
    assert product == pytest.approx(1 / (3 * 9) ** 0.5)  # shared: streamchat; the answer: it and 8 pairs
    assert topic_similarity("hello", "hello") == pytest.approx(1.0)
    assert topic_similarity("天气怎么样", "StreamChat runs offline") == 0.0
    assert topic_similarity("？！", "anything") is None and topic_similarity("hello", "") is None


def test_accelerator_metrics_only_for_what_an_engine_reports():
    class Reporting:
        def device_usage(self) -> list[DeviceUsage]:
            return [DeviceUsage("npu:3", memory_used_bytes=5 << 30, memory_total_bytes=32 << 30)]  # no utilisation

    def pool(engine: object) -> object:
        replica = type("Replica", (), {"index": 1, "model": type("Model", (), {"engine": engine})()})()
        return type("Pool", (), {"replicas": [replica]})()

    samples = [s for f in AcceleratorCollector(pool(Reporting())).collect() for s in f.samples]
    assert {(s.name, s.labels["replica"], s.labels["device"], s.value) for s in samples} == {
        ("streamchat_accelerator_memory_used_bytes", "1", "npu:3", 5 << 30),
        ("streamchat_accelerator_memory_total_bytes", "1", "npu:3", 32 << 30)}
    assert list(AcceleratorCollector(pool(object())).collect()) == []  # a CPU engine: no family at all


def test_request_line_is_one_line_with_the_escaped_text():
    line = request_line("openai", None, 'a\nb\u2028c "引号"')
    assert line.endswith('request endpoint=openai conversation=new chars=10 text="a\\nb\\u2028c \\"引号\\""')
    assert len(line.splitlines()) == 1


# ---- the real server ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    (root / "config" / "safety").mkdir(parents=True)
    (root / "config" / "safety" / "operator.txt").write_text(OPERATOR_LIST, encoding="utf-8")
    server = Server(root)
    yield server
    server.stop()


def test_metrics_match_what_happened(srv):
    async def chat():
        replies = []
        for frame in ({"text": PROMPT, "greedy": True, "max_new_tokens": 64},
                      {"text": "how to make a bomb"},  # the input check blocks it
                      {"text": REPEATING, "greedy": True, "repetition_penalty": 0.5, "max_new_tokens": 80}):
            async with websockets.connect(srv.ws_url) as ws:  # each a new conversation, as `generate` answers
                replies.append(await _answer(ws, frame))
        return [done for _, done in replies], ["".join(deltas) for deltas, _ in replies]

    before = scrape(srv)
    started = time.perf_counter()
    done, texts = asyncio.run(chat())
    completion = httpx.post(srv.url + "/v1/chat/completions", headers=JSON, timeout=60, json={
        "messages": [{"role": "user", "content": GREETING}], "temperature": 0}).json()
    wall = time.perf_counter() - started
    after = scrape(srv)
    assert [d["stop_reason"] for d in done] == ["eos", "blocked", "max_new_tokens"], done
    assert "＊＊＊＊" in texts[0] and "离线聊天" not in texts[0]  # the operator's word, masked

    references = {query: generate(srv.env, "--prompt", query, "--greedy", "--max-new-tokens", str(limit), *extra)
                  for query, limit, extra in ((PROMPT, 64, ()), (REPEATING, 80, ("--repetition-penalty", "0.5")),
                                              (GREETING, 512, ()))}
    assert references[PROMPT]["response"] == texts[0] and references[REPEATING]["response"] == texts[2]
    assert references[GREETING]["response"] == completion["choices"][0]["message"]["content"]

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)

    tokens = [len(r["token_ids"]) for r in references.values()]
    assert grew("streamchat_generated_tokens_total") == sum(tokens)
    assert sum(tokens) == done[0]["timings"]["tokens"] + done[2]["timings"]["tokens"] + \
        completion["usage"]["completion_tokens"]
    assert grew("streamchat_answers_total", stop_reason="eos") == 2
    assert grew("streamchat_answers_total", stop_reason="max_new_tokens") == 1
    assert grew("streamchat_answers_total", stop_reason="blocked") == 1
    assert grew("streamchat_request_seconds_count", endpoint="websocket") == 3
    assert grew("streamchat_request_seconds_count", endpoint="openai") == 1
    assert grew("streamchat_time_to_first_token_seconds_count") == 3  # the blocked message streamed nothing
    assert 3 <= grew("streamchat_inter_token_seconds_count") <= sum(tokens) - 3

    # replica busy time: at least the three generations' own time, at most the requests' wall time
    generation_s = sum(r["timings"]["prefill_ms"] + r["timings"]["decode_ms_per_token"] * (len(r["token_ids"]) - 1)
                       for r in references.values()) / 1000
    busy = grew("streamchat_replica_busy_seconds_total", replica="0")
    assert 0.2 * generation_s < busy < wall, (busy, generation_s, wall)  # the references ran in other processes

    # answer quality: the exact numbers of these answers, from the token ids and texts the pipeline produced
    rates = [repetition_rate(r["token_ids"]) for r in references.values()]
    assert rates[1] > 0.1 and rates[0] == 0.0  # the known repeating answer repeats; the product answer does not
    assert grew("streamchat_answer_repetition_ratio_count") == 3
    assert grew("streamchat_answer_repetition_ratio_sum") == pytest.approx(sum(rates))
    assert value(after, "streamchat_answer_repetition_ratio_bucket", le="0.15") - \
        before[("streamchat_answer_repetition_ratio_bucket", frozenset({"le": "0.15"}.items()))] == \
        sum(rate <= 0.15 for rate in rates)
    similarities = [topic_similarity(query, r["response"]) for query, r in references.items()]
    assert similarities[0] > 0 and similarities[2] > 0  # the product and greeting answers share a word with their question
    assert grew("streamchat_answer_topic_similarity_count") == 3
    assert grew("streamchat_answer_topic_similarity_sum") == pytest.approx(sum(similarities))
    assert grew("streamchat_answers_on_topic_total") == sum(similarity > 0 for similarity in similarities)

    # safety-filter hits: the blocked message at the input stage, the operator's word in the output
    assert grew("streamchat_safety_hits_total", stage="input", action="block", list="default.txt") == 1
    assert grew("streamchat_safety_hits_total", stage="output", action="mask", list="operator.txt") == 1
    audit = (srv.root / "data" / "audit.jsonl").read_text(encoding="utf-8")
    assert '"rule": "operator.txt:1", "action": "mask"' in audit and '"rule": "default.txt:' in audit  # as before

    # system: the process's own CPU and memory; no accelerator on CPU (nothing rather than zeros); queue and replicas
    assert value(after, "process_cpu_seconds_total") > 0 and value(after, "process_resident_memory_bytes") > 50e6
    assert not [key for key in after if key[0].startswith("streamchat_accelerator_")]
    assert value(after, "streamchat_queue_depth") == 0 and value(after, "streamchat_replicas") == 1
    assert value(after, "streamchat_busy_replicas") == 0
    assert grew("streamchat_errors_total", kind="internal") == 0 and grew("streamchat_errors_total", kind="engine") == 0


def test_a_paused_server_counts_a_stall(srv):
    """The server process stopped for 0.8 s mid-answer (as an overloaded machine would): the pause between two tokens
    is over 0.5 s and counted as a stall, and the stall counter agrees with the inter-token histogram."""
    async def chat():
        async with websockets.connect(srv.ws_url) as ws:
            await ws.send(json.dumps(LONG))
            await ws.recv()  # the first delta: the answer is generating
            os.kill(srv.process.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(0.8)
            finally:
                os.kill(srv.process.pid, signal.SIGCONT)
            while json.loads(await ws.recv())["type"] == "delta":
                pass

    before = scrape(srv)
    asyncio.run(chat())
    after = scrape(srv)
    stalls = value(after, "streamchat_token_stalls_total") - value(before, "streamchat_token_stalls_total")
    assert stalls >= 1
    over = value(after, "streamchat_inter_token_seconds_count") - value(after, "streamchat_inter_token_seconds_bucket",
                                                                        le="0.5")
    assert value(after, "streamchat_token_stalls_total") == over  # every gap over 0.5 s, and only those


@pytest.mark.parametrize("log_messages", [False, True])
def test_message_text_is_logged_only_with_log_messages(tmp_path, log_messages):
    marker = "日志标记 log-marker-7f3a"
    srv = Server(tmp_path, *(["--log-messages"] if log_messages else []))
    try:
        async def chat():
            async with websockets.connect(srv.ws_url) as ws:
                return await _answer(ws, {"text": marker, "max_new_tokens": 4})

        _, done = asyncio.run(chat())
        assert done["type"] == "done"
        reply = httpx.post(srv.url + "/v1/chat/completions", headers=JSON, timeout=60, json={
            "messages": [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": marker + " 2"}], "max_tokens": 4})
        assert reply.status_code == 200
    finally:
        srv.process.terminate()
        out, err = srv.process.communicate(timeout=60)
    lines = [line for line in (err + out).splitlines() if "log-marker" in line]
    if not log_messages:
        assert lines == [] and "earlier" not in err + out
        return
    assert len(lines) == 2, err
    assert lines[0].endswith(f'request endpoint=websocket conversation=new chars={len(marker)} text="{marker}"')
    assert lines[1].endswith(f'request endpoint=openai conversation=new chars={len(marker) + 2} text="{marker} 2"')
    assert "earlier" not in err  # the question only, not the conversation an OpenAI client resends
