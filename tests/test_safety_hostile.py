"""Hostile text against the safety filter: invisible characters and combining marks inside a word, markup that the
app would render as the word, and operator regexes that backtrack exponentially."""

from __future__ import annotations

import os
import subprocess
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from appliance.safety import MASK, RuleSet, SafetyError, StreamFilter, normalize, parse_rules  # noqa: E402

WORDS = ["bomb", "炸弹", "制造炸弹", "Straße"]
RULES = RuleSet.from_lines(WORDS, "list.txt")
# Characters that show nothing (or only decorate the letter before them) and are not in Unicode categories Z or C.
INVISIBLE = ["\u034f", "\ufe0f", "\ufe00", "\U000e0100", "\u3164", "\u115f", "\u1160", "\uffa0", "\u2800", "\u17b4",
             "\u180b", "\u0336", "\u0323", "\u0301", "\u20e3", "\u0e31"]
# ... and some that are, as a check that they still do nothing.
FORMAT = ["\u200b", "\u00ad", "\u2060", "\ufeff", "\u202e", "\U000e0041", "\u180e", "\u3000"]


def _stream(rules: RuleSet, text: str, cuts: list[int]) -> str:
    filt, out, pos = StreamFilter(rules), "", 0
    for size in cuts:
        out += filt.push(text[pos:pos + size])
        pos += size
    return out + filt.push(text[pos:]) + filt.finish()


@pytest.mark.parametrize("ch", INVISIBLE + FORMAT, ids=lambda c: f"U+{ord(c):04X}")
def test_invisible_character_inside_a_word_is_matched(ch):
    for word in ("bomb", "炸弹"):
        for at in range(1, len(word)):
            text = f"how to make a {word[:at]}{ch}{word[at:]}?"
            assert normalize(text) == normalize(f"how to make a {word}?")
            assert not RULES.verdict(text).allowed, text
            shown = RULES.mask(text)
            assert word[0] not in shown[len("how to make a "):] and shown.count(MASK) == len(word)


def test_precomposed_and_decomposed_accents_match_alike():
    assert normalize("bọmb") == normalize("bo\u0323mb") == normalize("b̶o̶m̶b̶") == "bomb"
    assert RULES.mask("a bọmb!") == f"a {MASK * 4}!"
    assert RULES.mask("STRASSE") == MASK * 7 and not RULES.verdict("straße").allowed
    assert normalize("한국어") == "한국어"  # Hangul syllables are letters, not marks: kept whole
    assert RULES.mask("café, naïve ok") == "café, naïve ok"  # text that matches nothing is shown as it came


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(WORDS[:3]), st.lists(st.tuples(st.integers(0, 8), st.sampled_from(INVISIBLE + FORMAT)), max_size=8),
       st.lists(st.integers(min_value=1, max_value=4), max_size=12))
def test_inserting_invisible_characters_never_lets_a_word_through(word, inserts, cuts):
    chars = list(word)
    for at, ch in inserts:
        chars.insert(min(at, len(chars)), ch)
    text = "前 " + "".join(chars) + " 后"
    assert not RULES.verdict(text).allowed
    shown = _stream(RULES, text, cuts)
    assert shown == RULES.mask(text)
    assert not any(letter in shown for letter in word)


def test_hold_back_maps_normalised_positions_back_to_the_original_text():
    filt = StreamFilter(RULES)
    assert filt.push("ok b") == "ok "
    assert filt.push("o\u0336\u034f") == ""  # "bo" may still become "bomb": held, marks included
    assert filt.held == "bo\u0336\u034f"
    assert filt.push("m\ufe0fb and more") == f"{MASK}{MASK}\u0336\u034f{MASK}\ufe0f{MASK} and more"


# -- operator regexes --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [r"(a+)+b", r"(a*)*b", r"(?:a|aa)+c", r"(?:ab|ab)+c", r"(\w+\s?)*$", r"(a+){2,}b",
                                     r"((ab)*c)*d", r"(a+){20}b", r"(?:x(a|b+))+", r"(a)(?:\1+)*b"])
def test_nested_repetition_is_refused_when_the_list_is_loaded(tmp_path, pattern):
    rules = tmp_path / "ops.txt"
    rules.write_text(f"fine\n# comment\nre:{pattern}\n", encoding="utf-8")
    with pytest.raises(SafetyError) as caught:
        RuleSet.load([rules])
    message = str(caught.value)
    assert message.startswith(f"ops.txt line 3: regex {pattern!r} has a nested repetition") and "\n" not in message


@pytest.mark.parametrize("pattern", [r"\d{3}-\d{4}", r"(ab)+c", r"(\d{3}-)+\d", r"a+b+c", r"(?:foo)?bar+",
                                     r"[a-z]+@[a-z]+\.com", r"(?:abc){2,5}d", r"(?:a|b|c)+d", r"(a+)?b"])
def test_ordinary_regexes_load_and_stay_fast(pattern):
    rules = RuleSet.from_lines([f"re{{60}}:{pattern}"], "ops.txt")
    start = time.perf_counter()
    rules.mask("a" * 60 + "x" + "ab" * 40)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("line", ["re{0}:a", "re{129}:a", "re{99999999999}:a"])
def test_regex_span_is_bounded(line):
    with pytest.raises(SafetyError, match=r"ops.txt line 1: the span of a regex rule must be between 1 and 128"):
        parse_rules([line], "ops.txt")


def test_chat_refuses_an_operator_list_with_a_nested_repetition(tmp_path):
    (tmp_path / "config" / "safety").mkdir(parents=True)
    (tmp_path / "config" / "safety" / "ops.txt").write_text("re:(a+)+b\n", encoding="utf-8")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"),
           "STREAMCHAT_DATA_DIR": str(tmp_path / "data"), "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "streamchat", "chat", "--demo"], input="a" * 60 + "\n/exit\n",
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ops.txt line 1: regex '(a+)+b' has a nested repetition")
    assert proc.stderr.count("\n") == 1


# -- what the desktop app shows ----------------------------------------------------------------------------------------

def _shown(qtbot, text: str, allowed=lambda text: True) -> str:
    """The plain text of the document the message's label actually displays."""
    pytest.importorskip("PySide6")
    pytest.importorskip("pytestqt")
    from PySide6.QtGui import QTextDocument

    from ui.messages import MessageView

    view = MessageView("assistant", text, allowed=allowed)
    qtbot.addWidget(view)
    view.body.sizeHint()  # the label lays its text out into a document lazily
    return view.body.findChild(QTextDocument).toPlainText()


@pytest.mark.parametrize("text", ["制造&#28856;弹", "bo&#x6d;b", "bo<i></i>mb", "bo<!--x-->mb", "a &lt;b&gt; &amp; c",
                                  "<script>alert(1)</script>", "x\ufdefy", "x\ufdee!y"])
def test_answers_show_markup_as_text(qtbot, text):
    assert RULES.verdict(text).allowed  # the filter saw no listed word ...
    shown = _shown(qtbot, text)
    assert shown == text.replace("\ufdef", "\ufffd").replace("\ufdee", "\ufffd")  # entities, tags, comments stay literal
    assert "炸" not in shown and "bomb" not in shown


def test_markdown_still_renders(qtbot):
    shown = _shown(qtbot, "# Title\n\n**bold** and `a && b <i>`\n\n```sh\nmake && echo '&#28856;'\n```\n\n- item")
    assert shown == "Title\nbold and a && b <i>\nmake && echo '&#28856;'\nitem"


@pytest.mark.parametrize("text", ["[bo](x)mb", "bo[](x)mb", "bo![](x.png)mb", "bo\n\n[r]: x\n\nmb"])
def test_markdown_that_joins_a_word_is_shown_as_plain_text(qtbot, text):
    assert RULES.verdict(text).allowed
    shown = _shown(qtbot, text, allowed=lambda shown: RULES.verdict(shown).allowed)
    assert RULES.verdict(shown).allowed
    assert shown == text  # the rendering would have joined a listed word: the characters as they came


def test_images_are_never_loaded(qtbot):
    assert _shown(qtbot, "![pic](/etc/hostname) here") == "!pic here"
