"""The built-in demo on its lists of 30 questions it was not trained on (``model_export/demo/*.jsonl`` as
``corpus.HELD_OUT`` names them; the newest is the one no choice has read): none of them is in the training text; the
shipped checkpoint answers them through the chat pipeline, as ``streamchat generate --demo --greedy`` does, with the
properties every sensible answer has (docs/demo.md lists the answers and the verdicts)."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from appliance.loading import DEMO_CHECKPOINT, DEMO_QUANT
from model_export.demo.corpus import HELD_OUT, normalized, read_corpus, read_groups
from model_export.demo.heldout import KINDS, answer_all, failed_checks, read_heldout
from model_export.export import export_bundle

LISTS = {name: read_heldout(name) for name in HELD_OUT}
# answers that pass every computed check, as docs/demo.md reports them for the shipped checkpoint
PASSING = {"dev": 30, "test": 28, "final": 30, "fresh": 29, "fifth": 28, "sixth": 26, "seventh": 26, "eighth": 26}


def _training_texts() -> list[str]:
    return [normalized(text) for ex in read_corpus()
            for text in [ex["query"], ex["answer"], *(part for turn in ex["history"] for part in turn)]]


@pytest.fixture(scope="module")
def answered(tmp_path_factory):
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    bundle = tmp_path_factory.mktemp("demo") / "bundle"
    export_bundle(DEMO_CHECKPOINT, bundle, quant=DEMO_QUANT, name="StreamChat demo model",
                  extra_manifest={"demo": True})
    return {name: answer_all(bundle, questions) for name, questions in LISTS.items()}


@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_each_list_is_15_chinese_and_15_english_questions_of_every_kind(name):
    questions = LISTS[name]
    assert Counter(q["lang"] for q in questions) == {"zh": 15, "en": 15}
    for lang in ("zh", "en"):
        assert Counter(q["kind"] for q in questions if q["lang"] == lang) == {
            "greeting": 3, "paraphrase": 6, "follow-up": 3, "off-topic": 3}
    assert set(KINDS) == {q["kind"] for q in questions}
    for q in questions:  # a follow-up is a second turn; the others start a conversation
        assert len(q["history"]) == (q["kind"] == "follow-up") and q["expect"]
    assert len({q["query"] for q in questions}) == 30


def test_the_lists_share_no_question():
    queries = [normalized(q["query"]) for questions in LISTS.values() for q in questions]
    assert len(set(queries)) == len(queries) == 30 * len(HELD_OUT)


def test_no_question_of_either_list_is_in_the_training_text():
    texts = _training_texts()
    assert any(normalized("What is kiosk mode?") in t for t in texts)  # the search finds what is there
    found = [q["query"] for questions in LISTS.values() for q in questions
             if any(normalized(q["query"]) in t for t in texts)]
    assert found == []


@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_answers_pass_their_checks(answered, name):
    """Every answer is whole text (not empty, no replacement character, no made-up word); at least the number
    docs/demo.md reports pass every check. The checks are necessary, not sufficient: docs/demo.md judges each answer
    by reading it."""
    broken = {a["query"]: a["answer"] for a in answered[name]
              if not {"empty", "replacement character", "made-up word"}.isdisjoint(a["failed"])}
    assert broken == {}
    passed = [a["query"] for a in answered[name] if not a["failed"]]
    assert len(passed) >= PASSING[name], {a["query"]: (a["answer"], a["failed"]) for a in answered[name] if a["failed"]}
    assert max(a["seconds"] for a in answered[name]) < 2.0  # "at once": 0.01-0.1 s each on a busy 2-core machine


def test_the_checks_reject_what_the_previous_demo_wrote():
    """Answers the demo gave before it was retrained (docs/demo.md): each fails the checks for the right reason."""
    by_query = {q["query"]: q for q in LISTS["dev"]}
    assert "no greeting" in failed_checks(by_query["Hello, who are you?"], ".")
    assert failed_checks(by_query["Where are my conversations saved?"], "") == ["empty"]
    assert "not Chinese" in failed_checks(by_query["我应该选哪个？"], "INT8 to getetetety 完全屏显， turtur, 高， CHl "
                                          "twice after Min pl or the streamchat comm twice 完was very manifest.")
    assert "made-up word" in failed_checks(by_query["How do I get rid of an old conversation?"],
                                           "Firstall the demo model debed only only with Delete machine, Ctrl+Nthe")
    assert failed_checks(by_query["What's the weather like today?"], "I cannot answer that.") == [
        "expected keyword missing", "not honest about being the demo"]
    assert "not English" in failed_checks(by_query["Which one should I pick?"], "INT4。")
    assert failed_checks(by_query["How can I quit kiosk mode?"], "Press Ctrl+Shift+Q.") == []


def test_the_cli_gives_the_same_answer_to_a_second_turn(answered, tmp_path):
    """The answers above are those of ``streamchat generate --demo --greedy --history``."""
    follow_up = next(a for a in answered["dev"] if a["kind"] == "follow-up" and a["lang"] == "zh")
    (tmp_path / "history.json").write_text(json.dumps(follow_up["history"], ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"), "STREAMCHAT_DATA_DIR": str(tmp_path / "data"),
           "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run([sys.executable, "-m", "streamchat", "generate", "--demo", "--greedy", "--json",
                          "--prompt", follow_up["query"], "--history", str(tmp_path / "history.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["response"] == follow_up["answer"]


def test_a_written_phrasing_of_no_group_is_refused_by_name(tmp_path):
    more = tmp_path / "paraphrases.jsonl"
    more.write_text('{"topic": "kiosk-leave", "lang": "zh", "after": "new", "queries": ["怎么出来？"]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"paraphrases.jsonl: corpus.jsonl has no group of topic 'kiosk-leave' "
                                         r"\(zh, after 'new'\)"):
        read_groups(more=more)
