"""Streaming safety filter latency: per delta and per 2,000-character answer, for 2k and 20k rules.

    python bench/safety_latency.py

Rules are random 2-8 character words (CJK and Latin); the answer is 2,000 characters of mixed text streamed in 1-3
character deltas (like tokens), with a few rule words planted in it.
"""

from __future__ import annotations

import random
import statistics
import time

from appliance.safety import RuleSet, StreamFilter

CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
LATIN = list("abcdefghijklmnopqrstuvwxyz")


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


def main() -> None:
    rng = random.Random(0)
    print("| rules | build ms | deltas | mean us/delta | p99 us/delta | max us/delta | ms per 2,000-char answer |")
    print("|---|---|---|---|---|---|---|")
    for count in (2_000, 20_000):
        words = [random_word(rng) for _ in range(count)]
        t0 = time.perf_counter()
        rules = RuleSet.from_lines(words, "bench")
        build_ms = (time.perf_counter() - t0) * 1000
        text = answer(rng, words)
        deltas, pos = [], 0
        while pos < len(text):
            step = rng.randint(1, 3)
            deltas.append(text[pos:pos + step])
            pos += step
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
        print(f"| {count:,} | {build_ms:.0f} | {len(deltas)} | {statistics.mean(per_delta):.1f} | "
              f"{per_delta[int(len(per_delta) * 0.99)]:.1f} | {per_delta[-1]:.1f} | {statistics.median(totals):.1f} |")


if __name__ == "__main__":
    main()
