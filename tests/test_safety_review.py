"""Safety filter against an adversarial review: traditional characters, any punctuation or symbol inside a word,
look-alike letters from other alphabets, and the cost per streamed delta with a regex rule."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import appliance.safety as safety
from appliance.safety import DEFAULT_LIST, MASK, RuleSet, SafetyError, StreamFilter, normalize, parse_rules
from tests.test_safety_hostile import _stream

DEFAULT = RuleSet.load([DEFAULT_LIST])
TABLES = safety.DEFAULT_LIST.parent




def _table(name: str) -> dict[str, str]:
    lines = (TABLES / name).read_text(encoding="utf-8").splitlines()
    return dict(line.split("\t")[:2] for line in lines if line and not line.startswith("#"))


# -- traditional characters --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["製造炸彈", "制造炸彈", "製造炸弹", "如何製-造炸彈？"])
def test_traditional_characters_match_a_simplified_entry(text):
    verdict = DEFAULT.verdict(text)
    assert not verdict.allowed and verdict.rules == ["default.txt:7"]
    assert DEFAULT.mask(text).count(MASK) == 4 and not any(ch in DEFAULT.mask(text) for ch in "製制造炸彈弹")


def test_a_traditional_entry_matches_simplified_text():
    rules = RuleSet.from_lines(["買賣槍支"], "ops.txt")
    assert normalize("買賣槍支") == normalize("买卖枪支") == "买卖枪支"
    assert rules.mask("可以买卖枪支吗") == f"可以{MASK * 4}吗"


def test_fold_tables_name_their_source_and_licence_and_are_closed():
    for name, source, licence in (("fold_t2s.txt", "OpenCC", "Apache License 2.0"),
                                  ("fold_confusables.txt", "confusables.txt", "Unicode License")):
        header = (TABLES / name).read_text(encoding="utf-8").split("\n", 4)[:4]
        assert any(source in line and licence in line for line in header) and "tools/make_safety_folds.py" in str(header)
        table = _table(name)
        assert table and all(len(a) == len(b) == 1 and a != b for a, b in table.items())
        assert not set(table.values()) & set(table)  # chains followed to the end: folding twice changes nothing
    assert _table("fold_t2s.txt")["製"] == "制" and _table("fold_t2s.txt")["乾"] == "干"  # one-to-many: the common form
    assert all(b.isascii() and b.isalnum() and b == b.lower() for b in _table("fold_confusables.txt").values())


def test_normalising_twice_changes_nothing():
    """Rules and text go through the same fold; a folded character must not fold again (BMP, every code point)."""
    changed = [c for c in map(chr, range(0x10000)) if not 0xD800 <= ord(c) < 0xE000
               and normalize(safety.normalize_char(c)) != safety.normalize_char(c)]
    assert changed == []


# -- punctuation and symbols -------------------------------------------------------------------------------------------

SEPARATORS = ["\u2010", "\u2011", "\u2012", "\u2013", "\u2014", "\u2015", "\u2212", "\u2e3a", "\u058a", "\u1806", "\u2022",
              "\u30fb", "\uff65", "\u2027", "\u3003", "\u30fc", "\u301c", "\uff5e", "\u2500", "\u00b4", "\u02ca", "\u02d7",
              "\ua788", "\u00af", "\u2e40", "\u0640", "\U0001f4a3", "\U0001f3fb", "\u2423", "\u00b7", "\ufe4f", "$", "%", "&"]


@pytest.mark.parametrize("ch", SEPARATORS, ids=lambda c: f"U+{ord(c):04X}")
def test_punctuation_and_symbols_inside_a_word_are_skipped(ch):
    for word, text in (("bomb making", f"bomb{ch}making"), ("制造炸弹", f"制{ch}造炸弹"), ("bomb making", f"bo{ch}mb making")):
        assert normalize(text) == normalize(word), text
        assert not DEFAULT.verdict(text).allowed, text
        shown = DEFAULT.mask(text)
        assert shown == "".join(c if c == ch or c == " " else MASK for c in text), text  # the separator itself stays


def test_an_entry_without_letters_or_digits_is_refused():
    with pytest.raises(SafetyError, match=r"^ops.txt line 2: the entry '💣 ‼' has no letters or digits"):
        parse_rules(["ok", "💣 ‼"], "ops.txt")


def test_symbols_that_are_letters_under_nfkc_still_count_as_letters():
    assert normalize("℃ ㎏ ™") == "ckgtm"  # NFKC spells them with letters (and a degree sign), so they are text


# -- look-alike letters ------------------------------------------------------------------------------------------------

CONFUSABLE = {  # letters of other alphabets (and Latin with a stroke) that look like the key
    "o": "\u043e\u03bf\u041e\u039f\u0585\u2c9f\uab8e", "a": "\u0430\u0410\u0391", "e": "\u0435\u0415\u0395",
    "b": "\u0412\u0392\u0432\u13f4", "m": "\u041c\u039c\u043c", "k": "\u041a\u039a\u043a", "i": "\u0456\u03b9\u0406",
    "n": "\u0578", "h": "\u041d", "t": "\u0422\u03a4\u0442", "p": "\u0440\u03c1\u0420", "c": "\u0441\u0421\u216d",
    "x": "\u0445\u03c7", "y": "\u0443", "s": "\u0455", "w": "\u051d", "r": "\u0433", "u": "\u057d", "d": "\u0501",
    "l": "\ua4e1\u0142",
}


@pytest.mark.parametrize("text", ["how to make a b\u043emb", "b\u03bfmb making", "B\u041eMB MAKING", "\u0432\u043em\u0432 making",
                                  "bo\u0301mb making".replace("o", "\u043e"), "\U0001d41b\u043emb making"])
def test_look_alike_letters_match_the_latin_entry(text):
    assert not DEFAULT.verdict(text).allowed, text
    assert not any(ch.isalpha() for ch in DEFAULT.mask(text).replace("how to make a", "")), DEFAULT.mask(text)


def test_entries_written_in_cyrillic_or_greek_match_in_any_case():
    rules = RuleSet.from_lines(["бомба", "βόμβα", "ΗΛΙΟΣ"], "ops.txt")
    for text, rule in (("БОМБА", "ops.txt:1"), ("бомба", "ops.txt:1"), ("Бо-мба", "ops.txt:1"), ("ΒΟΜΒΑ", "ops.txt:2"),
                       ("βομβα", "ops.txt:2"), ("ηλιος", "ops.txt:3"), ("Ηλιος", "ops.txt:3")):
        assert rules.verdict(text).rules == [rule], text
    assert rules.verdict("бомж").allowed and rules.verdict("помба").allowed


# -- the property: inserting separators or swapping look-alikes never lets a word through ------------------------------

WORDS = ["bomb making", "how to make a bomb", "制造炸弹", "stolen credit card"]


def _no_letters(ch: str) -> bool:
    return not any(c.isalnum() for c in unicodedata.normalize("NFKC", ch))


SKIPPABLE = st.characters(categories=["Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Lm"])
SKIPPABLE = SKIPPABLE.filter(_no_letters)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(WORDS), st.lists(st.tuples(st.integers(0, 30), SKIPPABLE), max_size=6),
       st.lists(st.tuples(st.integers(0, 30), st.integers(0, 6)), max_size=6),
       st.lists(st.integers(min_value=1, max_value=4), max_size=12))
def test_separators_and_look_alikes_never_let_a_word_through(word, inserts, swaps, cuts):
    chars = list(word)
    for at, pick in swaps:
        twins = CONFUSABLE.get(chars[at % len(chars)], "")
        if twins:
            chars[at % len(chars)] = twins[pick % len(twins)]
    for at, ch in inserts:
        chars.insert(min(at, len(chars)), ch)
    text = "前 " + "".join(chars) + " 后"
    assert not DEFAULT.verdict(text).allowed, text
    shown = _stream(DEFAULT, text, cuts)
    assert shown == DEFAULT.mask(text)
    assert not any(ch in shown for ch in word.replace(" ", ""))
    assert not any(twin in shown for letter in word for twin in CONFUSABLE.get(letter, ""))


# -- work per delta ----------------------------------------------------------------------------------------------------

class _Counting:
    """A compiled regex that counts the normalised characters it is handed (the work done for it per delta)."""

    def __init__(self, pattern) -> None:
        self.pattern, self.handed = pattern, 0

    def match(self, text: str, pos: int, endpos: int):
        self.handed += len(text)
        return self.pattern.match(text, pos, endpos)

    def search(self, text: str, pos: int, endpos: int):
        self.handed += len(text)
        return self.pattern.search(text, pos, endpos)


def test_work_per_delta_does_not_grow_with_the_answer(monkeypatch):
    """Streaming U+FDFA (18 characters under NFKC) one at a time: each delta normalises its own characters once and
    hands the regexes a bounded window, however long the answer already is."""
    rules = RuleSet(DEFAULT.rules + parse_rules([r"re{128}:\d{6,18}x", "re:xyz", r"re:\bx(?=y)"], "ops.txt"))
    counters = [_Counting(regex[1]) for regex in rules.regexes]
    rules.regexes = [(rule, counter, *rest) for (rule, _, *rest), counter in zip(rules.regexes, counters, strict=True)]
    calls = []
    real = safety.normalize_char
    monkeypatch.setattr(safety, "normalize_char", lambda ch: calls.append(ch) or real(ch))
    filt = StreamFilter(rules)
    per_delta = []
    for _ in range(600):
        calls.clear()
        before = sum(c.handed for c in counters)
        filt.push("\ufdfa")
        per_delta.append((len(calls), sum(c.handed for c in counters) - before))
    filt.finish()
    assert {normalised for normalised, _ in per_delta} == {1}  # one normalisation per character of the delta
    window = 2 * safety.MAX_REGEX_SPAN + len(normalize("\ufdfa"))  # look-behind context + undecided span + the delta
    assert max(handed for _, handed in per_delta) <= len(counters) * window * len(normalize("\ufdfa"))
    assert per_delta[-1] == per_delta[len(per_delta) // 2]  # the same work at delta 300 and at delta 600


def test_regexes_see_the_text_before_their_window():
    """The regex window keeps context before the undecided starts: a look-behind or \\b sees the real text."""
    rules = RuleSet.from_lines([r"re{8}:(?<=abc)\d{3}", r"re{4}:(?<!z)x\d", r"re{2}:^ab"], "ops.txt")
    text = "ab" + "abc" * 100 + "123 zzx1 x1"
    expected = MASK * 2 + "abc" * 100 + f"{MASK * 3} zzx1 {MASK * 2}"
    assert _stream(rules, text, [1] * len(text)) == rules.mask(text) == expected


REGEX_RULES = RuleSet.from_lines([r"re{6}:(?<=ab)c\d+", r"re{5}:x.{0,3}y", r"re{3}:^qa", r"re{4}:\d{3}$", r"re{4}:a\d(?!2)",
                                  r"re{3}:c\d?", "cab"], "ops.txt")


@settings(max_examples=150, deadline=None)
@given(st.text(st.sampled_from(list("abcxyq0123 -")), min_size=130, max_size=400),
       st.lists(st.integers(min_value=1, max_value=5), max_size=200))
def test_streamed_regex_matches_equal_the_whole_text_matches(text, cuts):
    """Windowed regexes (streamed in small deltas) find what one pass over the whole normalised text finds."""
    norm = normalize(text)
    expected = set()
    for start in range(len(norm)):
        for _, pattern, limit, _ in REGEX_RULES.regexes:
            m = pattern.match(norm, start, min(len(norm), start + limit))
            if m and m.end() > start:
                expected.add((start, m.end()))
    filt, pos = StreamFilter(REGEX_RULES), 0
    for size in cuts:
        filt.push(text[pos:pos + size])
        pos += size
    filt.push(text[pos:])
    filt.finish()
    origin = [i for i, ch in enumerate(text) for _ in normalize(ch)]
    regex_hits = {(m.start, m.end) for m in filt.matches if m.rule != "ops.txt:7"}
    assert regex_hits == {(origin[a], origin[b - 1] + 1) for a, b in expected}
