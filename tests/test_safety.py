"""Safety rules: normalisation, the automaton against brute force, and the streaming filter's guarantees."""

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.safety import MASK, AuditLog, RuleSet, StreamFilter, normalize, normalize_char, parse_rules

WORDS = ["bad", "badword", "ab", "坏词", "敏感内容", "xyz", "zz"]
RULES = RuleSet.from_lines(WORDS, "test")


def _brute_force_spans(rules: list[str], text: str) -> set[int]:
    """Original indices covered by a match, found by trying every rule at every normalised start."""
    norm, origin = "", []
    for i, ch in enumerate(text):
        for nc in normalize_char(ch):
            norm += nc
            origin.append(i)
    covered = set()
    for start in range(len(norm)):
        for word in rules:
            if norm.startswith(word, start):
                covered.update(range(origin[start], origin[start + len(word) - 1] + 1))
    return {i for i in covered if normalize_char(text[i])}


def test_normalisation():
    assert normalize("ＢＡＤ") == "bad"
    assert normalize("b a-d") == "bad"
    assert normalize("b\u200bad") == "bad"
    assert normalize("坏 词") == "坏词"
    assert normalize("Straße") == "strasse"


def test_mask_and_verdict():
    text = "A ＢＡＤ day, b\u200ba.d luck; 坏-词 and badwordy"
    # separators are ignored inside a match, so the rule "ab" also spans "A ＢＡＤ" (a known cost of that rule)
    assert RULES.mask(text) == "＊ ＊＊＊ day, ＊\u200b＊.＊ luck; ＊-＊ and ＊＊＊＊＊＊＊y"
    verdict = RULES.verdict("this has a 敏 感 内 容 inside")
    assert not verdict.allowed and verdict.rules == ["test:5"] and "test:5" in verdict.reason
    assert RULES.verdict("perfectly fine").allowed


def test_rule_files(tmp_path):
    rules = parse_rules(["# comment", "", "word  # trailing comment", r"re{8}:\d{3}#\d", "rebel"], "list.txt")
    assert [(r.id, r.pattern, r.regex) for r in rules] == [
        ("list.txt:3", "word", False), ("list.txt:4", r"\d{3}#\d", True), ("list.txt:5", "rebel", False)]
    (tmp_path / "a.txt").write_text("foo\n", encoding="utf-8")
    assert RuleSet.load([tmp_path / "a.txt"]).mask("a foo b") == "a ＊＊＊ b"


def test_regex_rules_stream_like_batch():
    rules = RuleSet.from_lines([r"re{12}:\d{3}\d{4}", "bad"], "r")
    text = "call 555-1234 now, bad"
    assert rules.mask(text) == "call ＊＊＊-＊＊＊＊ now, ＊＊＊"
    filt, out = StreamFilter(rules), ""
    for ch in text:
        out += filt.push(ch)
    assert out + filt.finish() == rules.mask(text)


def test_hold_back_is_bounded():
    filt = StreamFilter(RULES)
    assert filt.push("hello ") == "hello "
    assert filt.push("badwor") == ""  # could still become "badword"
    assert filt.held == "＊＊＊wor"  # "bad" is already masked; the rest waits
    assert filt.push("q") == "＊＊＊worq"


def test_stop_action_cuts_before_the_match():
    filt = StreamFilter(RULES, action="stop")
    out = filt.push("good start, then ba") + filt.push("d things")
    assert out == "good start, then " and filt.stopped
    assert filt.push("more") == "" and filt.finish() == ""


def test_audit_log(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record(RULES.scan("bad and bad"), "mask", "output", "bad and bad")
    assert log.counts() == {"test:1": 2}
    assert "bad" not in (tmp_path / "audit.jsonl").read_text().replace('"test:1"', "")
    AuditLog(tmp_path / "b.jsonl", log_text=True).record(RULES.scan("xyz"), "block", "input", "xyz")
    assert '"text": "xyz"' in (tmp_path / "b.jsonl").read_text()


ALPHABET = st.sampled_from(list("abdwordxyz 坏词敏感内容.-\u200bＢＡＤ，"))


@settings(max_examples=400, deadline=None)
@given(st.text(ALPHABET, max_size=60), st.lists(st.integers(min_value=1, max_value=7), max_size=30))
def test_streamed_text_is_the_masked_text_and_never_shows_a_match(text, cuts):
    filt, released, pos = StreamFilter(RULES), "", 0
    for size in cuts:
        released += filt.push(text[pos:pos + size])
        pos += size
        assert len(filt.held) <= len(text)
        assert released + filt.held == RULES.mask(text[:pos])[: len(released + filt.held)]
    released += filt.push(text[pos:]) + filt.finish()
    assert released == RULES.mask(text)
    covered = _brute_force_spans(WORDS, text)
    assert all(released[i] == MASK for i in covered)
    assert all(released[i] == text[i] for i in range(len(text)) if i not in covered)
