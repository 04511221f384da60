"""ChatSession: history, budgeted prompt, filtered input and output, stored results."""

import threading

import pytest

from appliance.history import History
from appliance.prompt import build_prompt
from appliance.safety import AuditLog, RuleSet
from appliance.session import SAFETY_NOTICE, ChatSession
from appliance.settings import Settings
from tests.conftest import PROMPTS

ZH = PROMPTS["zh_simple"]


def _settings(mode="mask"):
    s = Settings()
    s.generation.max_new_tokens, s.generation.repetition_penalty = 24, 1.2
    s.context_budget = 256
    s.safety.mode = mode
    return s


@pytest.fixture
def history(tmp_path):
    return History(tmp_path)


def _session(reference_engine, tokenizer, history, rules=("never-generated-phrase",), mode="mask", audit=None):
    return ChatSession(reference_engine, tokenizer, _settings(mode), history, RuleSet.from_lines(list(rules), "t"),
                       audit, model_id="fixture")


def test_answer_is_streamed_and_stored(reference_engine, tokenizer, history):
    session = _session(reference_engine, tokenizer, history)
    stream = session.send(ZH["query"], greedy=True)
    first = next(stream)
    cid = session.conversation_id
    assert [m.role for m in history.messages(cid)] == ["user"]  # stored before the answer, not per token
    text = first + "".join(stream)
    assert text == ZH["greedy"]["rp1.2"]["response"] == session.last.response
    user, answer = history.messages(cid)
    assert answer.text == text and answer.stop_reason == "max_new_tokens" and answer.bundle_id == "fixture"
    assert answer.timings["tokens"] == 24 and answer.settings["repetition_penalty"] == 1.2


def test_history_feeds_the_next_prompt(reference_engine, tokenizer, history):
    session = _session(reference_engine, tokenizer, history)
    first = "".join(session.send(ZH["query"], greedy=True))
    "".join(session.send("那明天呢？", greedy=True))
    expected_prompt = build_prompt("那明天呢？", [(ZH["query"], first)])
    assert session.last.generation.prompt_ids == tokenizer.encode_prompt(expected_prompt)
    reopened = _session(reference_engine, tokenizer, history)
    reopened.open(session.conversation_id)
    assert reopened.turns()[0] == (ZH["query"], first)


def test_cancel_is_stored_with_its_reason(reference_engine, tokenizer, history):
    session = _session(reference_engine, tokenizer, history)
    cancel = threading.Event()
    stream = session.send(ZH["query"], cancel, greedy=True)
    next(stream)
    cancel.set()
    list(stream)
    assert session.last.stopped == "cancelled"
    assert history.messages(session.conversation_id)[-1].stop_reason == "cancelled"


def test_blocked_input_is_not_sent_or_stored(reference_engine, tokenizer, history, tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    session = _session(reference_engine, tokenizer, history, rules=["介绍"], audit=audit)
    assert list(session.send(ZH["query"])) == []
    assert session.last.stopped == "blocked" and "t:1" in session.last.blocked_reason
    assert history.conversations() == [] and audit.counts() == {"t:1": 1}


def test_output_is_masked_before_it_is_shown(reference_engine, tokenizer, history):
    session = _session(reference_engine, tokenizer, history, rules=["写作"])
    deltas = list(session.send(ZH["query"], greedy=True))
    assert all("写" not in d and "作" not in d for d in deltas)
    expected = ZH["greedy"]["rp1.2"]["response"].replace("写作", "＊＊")
    assert "".join(deltas) == expected == history.messages(session.conversation_id)[-1].text


def test_stop_mode_ends_the_answer_with_a_notice(reference_engine, tokenizer, history):
    session = _session(reference_engine, tokenizer, history, rules=["写作"], mode="stop")
    text = "".join(session.send(ZH["query"], greedy=True))
    before = ZH["greedy"]["rp1.2"]["response"].split("写作")[0]
    assert text == before + SAFETY_NOTICE
    assert session.last.stopped == "safety" and history.messages(session.conversation_id)[-1].stop_reason == "safety"
    assert len(session.last.generation.token_ids) < 24


def test_without_history_turns_stay_in_memory(reference_engine, tokenizer):
    session = ChatSession(reference_engine, tokenizer, _settings())
    answer = "".join(session.send(ZH["query"], greedy=True))
    assert session.turns() == [(ZH["query"], answer)]
    session.clear()
    assert session.turns() == []


def test_engine_failure_keeps_the_question_and_the_partial_answer(reference_engine, tokenizer, history):
    from appliance.errors import EngineError

    class Failing:
        name, max_context = "failing", reference_engine.max_context

        def start(self):
            inner = reference_engine.start()

            class Seq:
                def prefill(self, ids, positions, mask):
                    return inner.prefill(ids, positions, mask)

                def step(self, token, positions):
                    raise EngineError("the MindSpore Lite step server stopped")

            return Seq()

    session = ChatSession(Failing(), tokenizer, _settings(), history, model_id="x")
    with pytest.raises(EngineError):
        list(session.send(ZH["query"], greedy=True))
    user, answer = history.messages(session.conversation_id)
    assert user.text == ZH["query"] and answer.stop_reason == "error"
