"""Streaming safety filter latency: per delta and per 2,000-character answer, for 2k and 20k rules, with and without
an operator regex rule.

    python bench/safety_latency.py

Rules are random 2-8 character words (CJK and Latin); the mixed answer is 2,000 characters of text streamed in 1-3
character deltas (like tokens), with a few rule words planted in it. The worst case is 2,000 U+FDFA characters (each
one NFKC-expands to 18) streamed one character at a time.
"""

from __future__ import annotations

import random
import statistics
import time

from appliance.safety import RuleSet, StreamFilter

CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
LATIN = list("abcdefghijklmnopqrstuvwxyz")
REGEX_RULE = r"re{128}:\d{6,18}x"


def random_word(rng: random.Random) -> str:
    alphabet = CJK if rng.random() < 0.5 else LATIN
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))


def answer(rng: random.Random, words: list[str], length: int = 2000) -> str:
    parts, size = [], 0
    while size < length:
        piece = rng.choice(words) if rng.random() < 0.01 else rng.choice([rng.choice(CJK), rng.choice(LATIN) * 3, " ", "，"])
        parts.append(piece)
        size += len(piece)
    return "".join(parts)[:length]


def split(rng: random.Random, text: str, most: int) -> list[str]:
    deltas, pos = [], 0
    while pos < len(text):
        step = rng.randint(1, most)
        deltas.append(text[pos:pos + step])
        pos += step
    return deltas


def measure(rules: RuleSet, deltas: list[str]) -> tuple[list[float], float]:
    """Microseconds per delta over 5 runs, and the median milliseconds per answer."""
    totals, per_delta = [], []
    for _ in range(5):
        filt = StreamFilter(rules)
        start = time.perf_counter()
        for d in deltas:
            t = time.perf_counter()
            filt.push(d)
            per_delta.append((time.perf_counter() - t) * 1e6)
        filt.finish()
        totals.append((time.perf_counter() - start) * 1000)
    per_delta.sort()
    return per_delta, statistics.median(totals)


def main() -> None:
    rng = random.Random(0)
    print("| rules | answer | build ms | deltas | mean us/delta | p99 us/delta | max us/delta | ms per 2,000-char answer |")
    print("|---|---|---|---|---|---|---|---|")
    for count in (2_000, 20_000):
        words = [random_word(rng) for _ in range(count)]
        mixed = split(rng, answer(rng, words), 3)
        worst = split(rng, "\ufdfa" * 2000, 1)
        for regex in ("", REGEX_RULE):
            t0 = time.perf_counter()
            rules = RuleSet.from_lines(words + ([regex] if regex else []), "bench")
            build_ms = (time.perf_counter() - t0) * 1000
            label = f"{count:,}" + (f" + `{regex}`" if regex else "")
            for name, deltas in (("mixed, 1-3 chars/delta", mixed), ("U+FDFA x2000, 1 char/delta", worst)):
                per_delta, total = measure(rules, deltas)
                print(f"| {label} | {name} | {build_ms:.0f} | {len(deltas)} | {statistics.mean(per_delta):.1f} | "
                      f"{per_delta[int(len(per_delta) * 0.99)]:.1f} | {per_delta[-1]:.1f} | {total:.1f} |")


if __name__ == "__main__":
    main()
