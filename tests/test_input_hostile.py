"""Hostile user input: undecodable bytes and lone surrogates, and very long conversations (the prompt planner must stay
linear and only tokenize what can fit)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.history import History
from appliance.prompt import build_prompt, plan_prompt
from appliance.tokenizer import ChatGLMTokenizer
from tests.conftest import TINY


def _env(tmp_path) -> dict[str, str]:
    return {**os.environ, "PYTHONIOENCODING": "utf-8", "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"),
            "STREAMCHAT_DATA_DIR": str(tmp_path / "data"), "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache")}


def _streamchat(tmp_path, *argv: str | bytes, stdin: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamchat", *argv], input=stdin, capture_output=True,
                          env=_env(tmp_path), timeout=timeout)


class CountingSentencePiece:
    """The real sentencepiece processor, counting how often and how much text it is asked to encode."""

    def __init__(self, sp) -> None:
        self.sp, self.calls, self.chars = sp, 0, 0

    def EncodeAsIds(self, text: str) -> list[int]:  # noqa: N802 - sentencepiece's name
        self.calls += 1
        self.chars += len(text)
        return self.sp.EncodeAsIds(text)

    def __getattr__(self, name: str):
        return getattr(self.sp, name)


def _counting_tokenizer() -> tuple[ChatGLMTokenizer, CountingSentencePiece]:
    tok = ChatGLMTokenizer.from_dir(TINY)
    counter = tok.sp = CountingSentencePiece(tok.sp)
    return tok, counter


def _plan_by_trying_every_cut(tokenizer, query, history, budget, max_new_tokens):
    """The specification: the fewest oldest rounds dropped so that the whole prompt fits."""
    room = budget - min(max_new_tokens, budget // 2)
    for dropped in range(len(history) + 1):
        text = build_prompt(query, history[dropped:])
        if len(tokenizer.encode_prompt(text)) <= room:
            return dropped, text
    return None


# -- undecodable input -----------------------------------------------------------------------------------------------

def test_tokenizer_replaces_lone_surrogates(tokenizer):
    assert tokenizer.encode("a\udcffb") == tokenizer.encode("a\ufffdb")  # an undecodable byte, surrogate-escaped
    assert tokenizer.encode("x\ud800") == tokenizer.encode("x\ufffd")  # half of a UTF-16 pair
    assert tokenizer.encode("\ud83d\ude00") == tokenizer.encode("\U0001f600")  # a split pair is one character


def test_generate_with_invalid_utf8_in_prompt_answers(tmp_path):
    proc = _streamchat(tmp_path, "generate", "--demo", "--greedy", "--max-new-tokens", "8", "--prompt", b"what \xff is\xc3")
    assert proc.returncode == 0, proc.stderr
    assert b"error" not in proc.stderr and proc.stdout.strip()


def test_chat_survives_invalid_utf8_on_stdin(tmp_path):
    proc = _streamchat(tmp_path, "chat", "--demo", "--greedy", "--max-new-tokens", "8",
                       stdin=b"bad \xff\xfe bytes\nStreamChat?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert b"error" not in proc.stderr and b"Traceback" not in proc.stderr
    assert proc.stdout.count(b"\n> ") == 3  # two questions answered, then the prompt /exit was typed at
    messages = History(tmp_path / "data").messages(1)
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0].text == "bad \ufffd\ufffd bytes" and messages[2].text == "StreamChat?"


# -- long conversations ----------------------------------------------------------------------------------------------

def _rounds(count: int) -> list[tuple[str, str]]:
    return [(f"第 {i} 个问题：今天天气怎么样？", f"回答 {i}：晴天，气温二十度。\n明天  多云。") for i in range(count)]


def test_plan_of_10000_rounds_tokenizes_only_the_window():
    tok, counter = _counting_tokenizer()
    history = _rounds(10_000)
    start = time.perf_counter()
    plan = plan_prompt(tok, "还会下雨吗？", history, 2048, 256)
    seconds = time.perf_counter() - start
    kept = len(history) - plan.dropped_rounds
    assert 10 < kept < 200 and len(plan.ids) <= 2048 - 256
    assert counter.calls <= 2 * kept + 10  # one call per kept round and round label, a few for the query and the check
    assert counter.chars <= 6 * len(plan.text)  # never the rounds far outside the window
    assert seconds < 5
    expected = _plan_by_trying_every_cut(tok, "还会下雨吗？", history[-300:], 2048, 256)
    assert expected == (300 - kept, plan.text)
    assert plan.notes == [f"left out the {plan.dropped_rounds} oldest round(s) of this conversation to fit the context "
                          "window"]


TEXT = st.lists(st.sampled_from(list("ab c你好，。！\n\tＦé") + ["   ", "[Round 1]", "<n>"]), max_size=12).map("".join)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT), max_size=12), TEXT.filter(str.strip), st.integers(min_value=20, max_value=160))
def test_plan_equals_trying_every_cut(tokenizer, history, query, budget):
    plan = plan_prompt(tokenizer, query, history, budget, 8)
    expected = _plan_by_trying_every_cut(tokenizer, query, history, budget, 8)
    if expected is None:
        assert plan.query_chars_dropped > 0 and plan.dropped_rounds == len(history)
    else:
        assert (plan.dropped_rounds, plan.text, plan.query_chars_dropped) == (*expected, 0)
        assert plan.ids == tokenizer.encode_prompt(plan.text)


def test_chat_resumes_a_huge_conversation_quickly_and_prints_only_the_end(tmp_path):
    turns = _rounds(10_000)
    messages = [{"role": role, "text": text, "created": 1.0, "stop_reason": "eos" if role == "assistant" else ""}
                for q, a in turns for role, text in (("user", q), ("assistant", a))]
    History(tmp_path / "data").import_json({"format": "streamchat-history", "version": 1, "conversations": [
        {"title": "long", "created": 1.0, "updated": 1.0, "messages": messages}]})
    start = time.perf_counter()
    proc = _streamchat(tmp_path, "chat", "--demo", "--greedy", "--max-new-tokens", "8", "--conversation", "1",
                       stdin=b"StreamChat?\n/exit\n", timeout=90)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "(9990 earlier turns not shown: streamchat history show 1 prints them all)" in out
    assert f"> {turns[-10][0]}" in out and f"> {turns[-11][0]}\n" not in out and len(out) < 5000
    assert "oldest round(s)" in proc.stderr.decode()  # the answer was planned within the window
    assert len(History(tmp_path / "data").messages(1)) == 20_002
    assert seconds < 60
