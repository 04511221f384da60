"""The demo model's training corpus: question/answer pairs about StreamChat (Chinese and English, some multi-turn)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus.jsonl"


def read_corpus(path: Path = CORPUS) -> list[dict]:
    """Each entry: ``{"history": [[q, a], ...], "query": str, "answer": str}``."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
