"""Safety rules for input and streamed output: word lists on an Aho-Corasick automaton, plus bounded regexes.

Matching happens on normalised text: each character is NFKC-normalised, case-folded and stripped of accents (so
full-width and half-width forms, ``ọ`` and ``o`` match alike), and characters that show nothing are skipped:
separators (spaces, zero-width and format characters, common punctuation), Unicode default-ignorable code points
(variation selectors, Hangul fillers, ...), the blank Braille pattern and combining marks, so ``b a-d`` and
``b\u034fa\u0336d`` match ``bad``. Each normalised character remembers the original one it came from: the stream
releases and masks original text. The streaming filter releases text only when no rule can still match across it: it
holds back the automaton's current partial match (at most the longest rule minus one character) and the
not-yet-decidable window of the regex rules.
"""

from __future__ import annotations

import gc
import json
import re
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

try:  # the parser behind re.compile, to inspect a regex's structure (private: re._parser since 3.11)
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_constants
    import sre_parse

from appliance.errors import StreamChatError

MASK = "＊"
DEFAULT_LIST = Path(__file__).parent / "safety_lists" / "default.txt"
REGEX_PREFIX = "re:"
DEFAULT_REGEX_SPAN = 32
MAX_REGEX_SPAN = 128  # every regex is tried at every start over its span: the filter's cost grows with it
_PUNCT_SEPARATORS = set("-_.*·|/\\~+,'\"`^=#@!?:;()[]{}<>，。、！？：；“”‘’（）【】《》…—")


class SafetyError(StreamChatError):
    """A rule list cannot be read or holds a bad regex (the message names file and line)."""


# Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties.txt, unchanged from Unicode 14 to 15.1), which Python's
# unicodedata does not expose: code points that renderers show as nothing. Most are also in category Cf/Cn or Mn; the
# table matters for the rest (U+115F/U+1160/U+3164/U+FFA0 Hangul fillers are letters, category Lo).
_DEFAULT_IGNORABLE_RANGES = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
    (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)
_BRAILLE_BLANK = 0x2800  # shows nothing, yet is a symbol (category So)
_INVISIBLE = frozenset(c for lo, hi in _DEFAULT_IGNORABLE_RANGES for c in range(lo, hi + 1)) | {_BRAILLE_BLANK}


def _ignorable(ch: str) -> bool:
    """Characters a match skips: separators, invisible characters, combining marks (category M: accents, strokes)."""
    return ch in _PUNCT_SEPARATORS or ord(ch) in _INVISIBLE or unicodedata.category(ch)[0] in "ZCM"


@lru_cache(maxsize=1 << 16)
def normalize_char(ch: str) -> str:
    """What one character contributes to the matched text (often nothing, sometimes several characters).

    NFKC and case folding, then decomposition (NFD) so an accented letter sheds its combining marks like a letter
    followed by marks does, then NFC to rejoin what decomposition split but kept (Hangul syllables).
    """
    decomposed = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", ch).casefold())
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not _ignorable(c)))


def normalize(text: str) -> str:
    return "".join(normalize_char(ch) for ch in text)


@dataclass(frozen=True)
class Rule:
    id: str  # "<list file>:<line>"
    pattern: str  # normalised word, or regex source
    regex: bool = False
    span: int = 0  # longest text a regex may match (normalised characters)


@dataclass(frozen=True)
class Match:
    rule: str
    start: int  # original character offsets, end exclusive
    end: int


class Automaton:
    """Aho-Corasick over normalised words: one transition per character, all matches ending there reported.

    Transitions live in one flat dict keyed by ``state << 21 | codepoint`` (ints only, so the garbage collector never
    tracks it) rather than a dict per node: a 20,000-word list costs no collector pause in the middle of an answer.
    """

    def __init__(self, words: list[tuple[str, int]]) -> None:
        self.goto: dict[int, int] = {}
        children: list[list[tuple[str, int]]] = [[]]
        self.depth = [0]
        ends: dict[int, list[tuple[int, int]]] = {}
        for word, rule in words:
            node = 0
            for ch in word:
                nxt = self.goto.get(node << 21 | ord(ch))
                if nxt is None:
                    nxt = self.goto[node << 21 | ord(ch)] = len(self.depth)
                    children[node].append((ch, nxt))
                    children.append([])
                    self.depth.append(self.depth[node] + 1)
                node = nxt
            ends.setdefault(node, []).append((rule, len(word)))
        self.fail = [0] * len(self.depth)
        self.out: dict[int, tuple[tuple[int, int], ...]] = {}  # (rule index, length) of words ending at a state
        queue = deque(child for _, child in children[0])
        for child in queue:
            self.out[child] = tuple(ends.get(child, ()))
        while queue:
            node = queue.popleft()
            for ch, child in children[node]:
                queue.append(child)
                self.fail[child] = self.step(self.fail[node], ch)
                self.out[child] = tuple(ends.get(child, ())) + self.out.get(self.fail[child], ())
        self.out = {state: found for state, found in self.out.items() if found}

    def step(self, state: int, ch: str) -> int:
        goto, code = self.goto, ord(ch)
        while state and (state << 21 | code) not in goto:
            state = self.fail[state]
        return goto.get(state << 21 | code, 0)

class RuleSet:
    """Word and regex rules compiled once; cheap to share between threads (filters keep their own state)."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        words = [(r.pattern, i) for i, r in enumerate(rules) if not r.regex and r.pattern]
        self.automaton = Automaton(words)
        self.regexes = [(i, re.compile(r.pattern), r.span) for i, r in enumerate(rules) if r.regex]
        self.regex_span = max([r.span for r in rules if r.regex], default=0)
        gc.collect()  # settle the build's garbage now, not as a pause in the first answer that streams through
        self.longest = max([len(w) for w, _ in words] + [self.regex_span, 0])

    @classmethod
    def from_lines(cls, lines: list[str], source: str) -> RuleSet:
        return cls(parse_rules(lines, source))

    @classmethod
    def load(cls, paths: list[Path]) -> RuleSet:
        rules: list[Rule] = []
        for path in paths:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise SafetyError(f"cannot read safety list {path}: {exc}") from exc
            rules += parse_rules(lines, path.name)
        return cls(rules)

    def scan(self, text: str) -> list[Match]:
        filt = StreamFilter(self, action="mask")
        filt.push(text)
        filt.finish()
        return filt.matches

    def verdict(self, text: str) -> Verdict:
        """Input check: block when any rule matches, naming the rule (never the matched text)."""
        matches = self.scan(text)
        if not matches:
            return Verdict(True, [], "")
        ids = sorted({m.rule for m in matches})
        return Verdict(False, ids, f"your message contains blocked content (rule {', '.join(ids)}); rephrase it")

    def mask(self, text: str) -> str:
        filt = StreamFilter(self, action="mask")
        return filt.push(text) + filt.finish()


def parse_rules(lines: list[str], source: str) -> list[Rule]:
    """One entry per line; ``#`` starts a comment; ``re:PATTERN`` or ``re{N}:PATTERN`` is a regex matching at most N
    normalised characters (default 32, at most 128)."""
    rules = []
    for number, raw in enumerate(lines, 1):
        regex = re.match(r"\s*re(?:\{(\d+)\})?:(.*?)\s*$", raw)  # a regex keeps its '#'
        line = raw.strip() if regex else raw.split("#", 1)[0].strip()
        if not line:
            continue
        rule_id = f"{source}:{number}"
        if regex:
            span = int(regex.group(1) or DEFAULT_REGEX_SPAN)
            if not 1 <= span <= MAX_REGEX_SPAN:
                raise SafetyError(f"{source} line {number}: the span of a regex rule must be between 1 and "
                                  f"{MAX_REGEX_SPAN} characters, got {span}")
            _check_regex(regex.group(2), f"{source} line {number}")
            rules.append(Rule(rule_id, regex.group(2), regex=True, span=span))
        elif normalize(line):
            rules.append(Rule(rule_id, normalize(line)))
    return rules


_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, getattr(sre_constants, "POSSESSIVE_REPEAT", None)}


def _check_regex(pattern: str, where: str) -> None:
    """Refuse a regex that does not compile, or that can backtrack exponentially.

    Python's regex engine backtracks: a repeated group whose body can match the same text in several ways (``(a+)+b``,
    ``(a|aa)*c``) tries exponentially many splits of a text that almost matches, which would stall the answer stream
    for minutes. Such patterns are refused when the list is loaded, from their parsed structure: a repeat of more than
    one may not contain a variable repeat, an alternation or a back-reference.
    """
    try:
        re.compile(pattern)
        nested = any(op in _REPEATS and av[1] > 1 and any(_varies(o, a) for o, a in _nodes(av[2]))
                     for op, av in _nodes(sre_parse.parse(pattern)))
    except (re.error, RecursionError) as exc:
        raise SafetyError(f"{where}: bad regex {pattern!r} ({exc})") from exc
    if nested:
        raise SafetyError(f"{where}: regex {pattern!r} has a nested repetition (a repeated group containing a variable "
                          "repeat or an alternation, like (a+)+ or (a|aa)*), which can take exponential time: rewrite "
                          "it without the nesting, or as several rules")


def _nodes(tree) -> Iterator[tuple[object, object]]:
    """Every (op, argument) of a parsed regex, nested ones included."""
    for op, av in tree:
        yield op, av
        for child in _subpatterns(av):
            yield from _nodes(child)


def _subpatterns(av) -> Iterator[object]:
    if isinstance(av, sre_parse.SubPattern):
        yield av
    elif isinstance(av, tuple | list):
        for item in av:
            yield from _subpatterns(item)


def _varies(op, av) -> bool:
    """Whether this node can match different texts in different ways: a variable repeat, alternation, back-reference."""
    return (op in _REPEATS and av[0] != av[1]) or op in (sre_constants.BRANCH, sre_constants.GROUPREF,
                                                          sre_constants.GROUPREF_EXISTS)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rules: list[str]
    reason: str


class StreamFilter:
    """Takes text deltas, releases text that no rule can still match across; ``released + held == masked text``."""

    def __init__(self, rules: RuleSet, action: str = "mask") -> None:
        if action not in ("mask", "stop"):
            raise ValueError(f"action must be mask or stop, not {action!r}")
        self.rules, self.action = rules, action
        self.text: list[str] = []
        self.masked: set[int] = set()
        self.origin: list[int] = []  # original index of each normalised character
        self.norm: list[str] = []
        self.state = 0
        self.regex_next = 0  # first normalised start not yet tried by the regex rules
        self.released = 0
        self.matches: list[Match] = []
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        automaton = self.rules.automaton
        for ch in delta:
            index = len(self.text)
            self.text.append(ch)
            for nc in normalize_char(ch):
                self.origin.append(index)
                self.norm.append(nc)
                self.state = automaton.step(self.state, nc)
                for rule, length in automaton.out.get(self.state, ()):
                    self._hit(rule, self.origin[len(self.norm) - length], index + 1)
        self._try_regexes(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """Release everything held (the answer is complete)."""
        if self.stopped:
            return ""
        self._try_regexes(final=True)
        return self._release(final=True)

    @property
    def held(self) -> str:
        return "".join(MASK if i in self.masked else self.text[i] for i in range(self.released, len(self.text)))

    def _hit(self, rule: int, start: int, end: int) -> None:
        """Mask the characters of the match that count in it (separators and marks inside it stay as they are)."""
        self.matches.append(Match(self.rules.rules[rule].id, start, end))
        self.masked.update(i for i in range(start, end) if normalize_char(self.text[i]))

    def _try_regexes(self, final: bool) -> None:
        if not self.rules.regexes:
            return
        norm, n = "".join(self.norm), len(self.norm)
        last = n if final else n - self.rules.regex_span + 1
        for start in range(self.regex_next, max(self.regex_next, last)):
            for rule, pattern, limit in self.rules.regexes:
                m = pattern.match(norm, start, min(n, start + limit))
                if m and m.end() > start:
                    self._hit(rule, self.origin[start], self.origin[m.end() - 1] + 1)
        self.regex_next = max(self.regex_next, last)

    def _release(self, final: bool) -> str:
        if self.action == "stop" and self.matches:
            cut = min(m.start for m in self.matches)
            out = "".join(self.text[self.released:cut])
            self.released, self.stopped = cut, True
            return out
        if final:
            boundary = len(self.text)
        else:
            first_open = min(len(self.norm) - self.rules.automaton.depth[self.state],
                             self.regex_next if self.rules.regexes else len(self.norm))
            boundary = self.origin[first_open] if first_open < len(self.norm) else len(self.text)
        out = "".join(MASK if i in self.masked else self.text[i] for i in range(self.released, boundary))
        self.released = max(self.released, boundary)
        return out


class AuditLog:
    """Counters for the operator: one JSON line per rule hit (rule id, time, action, where), text only if enabled."""

    def __init__(self, path: Path, log_text: bool = False) -> None:
        self.path, self.log_text = path, log_text

    def record(self, matches: list[Match], action: str, where: str, text: str = "") -> None:
        if not matches:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            for m in matches:
                entry = {"time": time.time(), "rule": m.rule, "action": action, "where": where}
                if self.log_text:
                    entry["text"] = text[m.start:m.end]
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def counts(self) -> Counter:
        if not self.path.exists():
            return Counter()
        return Counter(json.loads(line)["rule"] for line in self.path.read_text(encoding="utf-8").splitlines() if line)
