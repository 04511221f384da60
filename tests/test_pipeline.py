"""One pipeline: `generate`, `chat` and the app answer through ChatSession, with the safety lists and the saved settings;
a session takes new settings and rules while it lives (rules from the next delta of the answer in flight)."""

import json
import os
import subprocess
import sys
import threading

import pytest

from appliance.generation import GenerationConfig, StreamGenerator
from appliance.history import History
from appliance.safety import MASK, RuleSet
from appliance.session import SAFETY_NOTICE, ChatSession
from appliance.settings import Settings
from streamchat.cli import main
from tests.conftest import PROMPTS, TINY

ZH = PROMPTS["zh_simple"]  # its greedy rp1.2 answer repeats 写作, a word the fixture model really writes
WORD = "写作"
ANSWER = ZH["greedy"]["rp1.2"]["response"]
GREEDY = ["--greedy", "--max-new-tokens", "24", "--repetition-penalty", "1.2"]


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """A private config and data folder; returns the config folder."""
    monkeypatch.setenv("STREAMCHAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "config").mkdir()
    return tmp_path / "config"


def _operator_list(config, *words):
    (config / "safety").mkdir()
    (config / "safety" / "operator.txt").write_text("\n".join(words) + "\n", encoding="utf-8")


def _save(config, raw):
    (config / "settings.json").write_text(json.dumps(raw), encoding="utf-8")


def _generate(capsys, *extra, prompt=ZH["query"]):
    code = main(["generate", "--checkpoint", str(TINY), "--prompt", prompt, "--json", *extra])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def test_generate_masks_a_listed_word_in_the_answer(capsys, folders, tmp_path):
    _operator_list(folders, WORD)
    code, out, _ = _generate(capsys, *GREEDY)
    assert code == 0
    assert out["token_ids"] == ZH["greedy"]["rp1.2"]["new_token_ids"]  # the model answered as always
    assert out["response"] == ANSWER.replace(WORD, MASK * 2) != ANSWER
    assert "".join(out["deltas"]) == out["response"] and not any(c in d for d in out["deltas"] for c in WORD)
    audit = [json.loads(line) for line in (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]
    assert {(a["rule"], a["where"]) for a in audit} == {("operator.txt:1", "output")}
    assert not (tmp_path / "data" / "history.sqlite3").exists()  # generate stores no conversation


def test_generate_stops_at_a_listed_word_in_stop_mode(capsys, folders):
    _operator_list(folders, WORD)
    _save(folders, {"safety": {"mode": "stop"}})
    code, out, _ = _generate(capsys, *GREEDY)
    assert code == 0 and out["stopped"] == "safety"
    assert out["response"] == ANSWER.split(WORD)[0] + SAFETY_NOTICE


def test_generate_refuses_a_listed_word_in_the_prompt(capsys, folders):
    _operator_list(folders, "介绍")
    code = main(["generate", "--checkpoint", str(TINY), "--prompt", ZH["query"], *GREEDY])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err == "error: your message contains blocked content (rule operator.txt:1); rephrase it\n"


def test_generate_samples_with_the_saved_settings_and_flags_override_them(capsys, folders, reference_engine, tokenizer):
    _save(folders, {"generation": {"temperature": 0.3, "top_p": 0.5, "max_new_tokens": 6}})
    code, out, _ = _generate(capsys, "--seed", "3")
    assert code == 0
    assert {k: out["settings"][k] for k in ("temperature", "top_p", "max_new_tokens", "top_k")} == \
        {"temperature": 0.3, "top_p": 0.5, "max_new_tokens": 6, "top_k": 50}
    expected = StreamGenerator(reference_engine, tokenizer).run(
        ZH["prompt_input_ids"], GenerationConfig(temperature=0.3, top_p=0.5, max_new_tokens=6, seed=3))
    assert out["token_ids"] == expected.token_ids  # sampled with them, not only reported

    code, out, _ = _generate(capsys, "--seed", "3", "--temperature", "0.8")
    assert (out["settings"]["temperature"], out["settings"]["top_p"]) == (0.8, 0.5)


def test_a_flag_outside_the_schema_is_one_line_naming_it(capsys, folders):
    code = main(["generate", "--checkpoint", str(TINY), "--prompt", "x", "--max-new-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "error: --max-new-tokens (setting generation.max_new_tokens) must be between 1 and 8192, got 0\n"


def _chat(tmp_path, stdin, *extra):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"),
           "STREAMCHAT_DATA_DIR": str(tmp_path / "data"), "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "streamchat", "chat", "--checkpoint", str(TINY), *extra], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)


def test_chat_samples_with_the_saved_settings_and_filters_with_the_lists(tmp_path, folders):
    _save(folders, {"generation": {"temperature": 0.3, "top_p": 0.5, "repetition_penalty": 1.2}})
    _operator_list(folders, WORD)
    proc = _chat(tmp_path, f"{ZH['query']}\n你好\n/exit\n", "--seed", "1", "--top-p", "0.9")
    assert proc.returncode == 0, proc.stderr
    history = History(tmp_path / "data")
    first, second = (m for m in history.messages(history.conversations()[0].id) if m.role == "assistant")
    assert (first.settings["temperature"], first.settings["top_p"]) == (0.3, 0.9)  # saved, then the flag
    assert first.settings == second.settings

    greedy = _chat(tmp_path, f"{ZH['query']}\n/exit\n", "--greedy", "--max-new-tokens", "24")
    assert ANSWER.replace(WORD, MASK * 2) in greedy.stdout and WORD not in greedy.stdout


# -- ChatSession.update ------------------------------------------------------------------------------------------
def _session(reference_engine, tokenizer, words=("never-generated-phrase",), mode="mask", history=None):
    settings = Settings()
    settings.generation.max_new_tokens, settings.context_budget, settings.safety.mode = 24, 256, mode
    return ChatSession(reference_engine, tokenizer, settings, history, RuleSet.from_lines(list(words), "t"))


def test_new_rules_apply_from_the_next_delta_of_the_answer_in_flight(reference_engine, tokenizer, tmp_path):
    session = _session(reference_engine, tokenizer, history=History(tmp_path))
    stream = session.send(ZH["query"], greedy=True)
    first = next(stream)
    assert WORD not in first and ANSWER.startswith(first)
    session.update(rules=RuleSet.from_lines([WORD], "reloaded"))
    rest = list(stream)
    assert all(c not in d for d in rest for c in WORD)
    shown = first + "".join(rest)
    assert shown == first + ANSWER.replace(WORD, MASK * 2)[len(first):] == session.last.response
    assert session.history.messages(session.conversation_id)[-1].text == shown


def test_new_rules_stop_the_answer_in_flight_in_stop_mode(reference_engine, tokenizer):
    session = _session(reference_engine, tokenizer, mode="stop")
    stream = session.send(ZH["query"], greedy=True)
    first = next(stream)
    session.update(rules=RuleSet.from_lines([WORD], "reloaded"))
    assert first + "".join(stream) == ANSWER.split(WORD)[0] + SAFETY_NOTICE
    assert session.last.stopped == "safety"


def test_a_rules_update_from_another_thread_reaches_the_stream(reference_engine, tokenizer):
    session = _session(reference_engine, tokenizer)
    reloaded = RuleSet.from_lines([WORD], "reloaded")
    stream = session.send(ZH["query"], greedy=True)
    first = next(stream)
    updater = threading.Thread(target=session.update, kwargs={"rules": reloaded})
    updater.start()
    updater.join()
    assert WORD not in first + "".join(stream)


def test_new_settings_apply_from_the_next_send(reference_engine, tokenizer, tmp_path):
    session = _session(reference_engine, tokenizer, history=History(tmp_path))
    shorter = Settings()
    shorter.generation.max_new_tokens, shorter.generation.temperature = 3, 0.5
    stream = session.send(ZH["query"], greedy=True)
    next(stream)
    session.update(settings=shorter)
    shorter.generation.max_new_tokens = 1  # the caller's object: the session keeps its own copy
    list(stream)
    assert len(session.last.generation.token_ids) == 24  # the answer in flight keeps its settings
    list(session.send("那明天呢？", greedy=True))
    assert len(session.last.generation.token_ids) == 3
    stored = session.history.messages(session.conversation_id)[-1].settings
    assert (stored["max_new_tokens"], stored["temperature"]) == (3, 0.5)
