"""Two cheap numbers about one answer, computed offline from what the pipeline already has: how much it repeats itself
and whether it speaks about the question at all. The service exports them as metrics; any front end can show them.

Repetition rate: the share of the answer's token n-grams (``REPETITION_N`` = 4 consecutive token ids) that already
occurred earlier in the same answer, ``1 - distinct / total``. A model caught in a loop scores near 1; ordinary prose
scores near 0. Answers shorter than ``REPETITION_N`` tokens have no n-gram and no rate (None).

Topic similarity: the cosine between the term counts of the question and of the answer, where terms are Latin-script
words and digits (NFKC, case-folded) and, for Chinese/Japanese/Korean script, overlapping character pairs (a lone
character is a term by itself), since those scripts do not separate words. It is lexical: a good answer usually scores
0.05 to 0.4 (it repeats a few of the question's words among many others), an answer that shares no term with its
question scores 0. An answer is *on topic* when it shares at least one term (score > 0); what the service watches is
the share of answers on topic, which drops toward 0 when a model emits garbage or answers something else entirely.
It cannot judge meaning: a correct answer in other words than the question's scores 0. A question without terms
(only punctuation or emoji) or an empty answer has no score (None).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Sequence

REPETITION_N = 4

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TERMS = re.compile(f"(?P<cjk>[{_CJK}]+)|(?:(?![{_CJK}])[^\\W_])+")


def repetition_rate(tokens: Sequence[Hashable], n: int = REPETITION_N) -> float | None:
    """The share of the ``n``-grams of ``tokens`` that repeat an earlier one; None with fewer than ``n`` tokens."""
    total = len(tokens) - n + 1
    if total <= 0:
        return None
    distinct = len({tuple(tokens[i:i + n]) for i in range(total)})
    return 1 - distinct / total


def terms(text: str) -> Counter[str]:
    """The term counts of ``text``: Latin-script words and numbers, and character pairs of CJK runs."""
    found: Counter[str] = Counter()
    for match in _TERMS.finditer(unicodedata.normalize("NFKC", text).casefold()):
        run = match.group()
        if match.lastgroup == "cjk":
            found.update([run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)])
        else:
            found[run] += 1
    return found


def topic_similarity(question: str, answer: str) -> float | None:
    """The cosine between the term counts of ``question`` and ``answer`` (0 to 1); None when either has no term."""
    q, a = terms(question), terms(answer)
    if not q or not a:
        return None
    dot = sum(count * a[term] for term, count in q.items())
    return dot / math.sqrt(sum(c * c for c in q.values()) * sum(c * c for c in a.values()))
