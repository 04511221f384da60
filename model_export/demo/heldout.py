"""The demo model's lists of 30 questions it was not trained on, and their answers through the chat pipeline.

    python -m model_export.demo.heldout [--set dev|test|final|fresh|fifth|sixth|seventh|eighth] [--checkpoint DIR]
                                        [--out answers.json]

Each list (15 zh, 15 en; greetings, paraphrases of help questions, second turns, off-topic questions) is kept out of
the training text: ``model_export.demo.corpus`` drops every training question that contains one of them. Each list
was written and committed before a training round and answered by the model that round chose (and its retraining, if
any); after that its answers were read while later training texts and variants were chosen, so only the newest list is
unread by any choice (``corpus.HELD_OUT`` names them in order; docs/demo.md says which list is which and what each
model scored).
Each question is answered as ``streamchat generate --demo --greedy`` answers it: the checkpoint exported to the
demo's INT8 bundle, a ``ChatSession`` with the default settings and the bundled safety list, greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from functools import cache
from pathlib import Path

from appliance.loading import DEMO_CHECKPOINT, DEMO_QUANT, open_bundle
from appliance.safety import DEFAULT_LIST, RuleSet
from appliance.session import ChatSession
from appliance.settings import Settings
from model_export.demo.corpus import HELD_OUT, read_groups

LANGUAGES = ("zh", "en")
KINDS = ("greeting", "paraphrase", "follow-up", "off-topic")
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
LATIN_WORD = re.compile(r"[A-Za-z]+")
# English words that only English prose has: a Chinese answer that contains one has slipped into English
ENGLISH_PROSE = {"the", "a", "an", "and", "or", "is", "are", "to", "of", "with", "your", "you", "it", "in", "on",
                 "for", "no", "not", "then", "can", "this", "that", "was", "by"}
GREETING = {"zh": re.compile(r"你好|您好"), "en": re.compile(r"\b(hello|hi|hey)\b", re.IGNORECASE)}
DEMO = {"zh": "演示", "en": "demo"}


def read_heldout(name: str) -> list[dict]:
    """Each entry: ``{"lang": "zh" | "en", "kind": one of KINDS, "history": [[q, a], ...], "query": str,
    "expect": [keyword, ...]}``, the keywords any on-topic answer names at least one of."""
    return [json.loads(line) for line in HELD_OUT[name].read_text(encoding="utf-8").splitlines() if line.strip()]


def cjk_share(text: str) -> float:
    """CJK characters among the text's word units (a CJK character or a run of Latin letters each count one)."""
    cjk = len(CJK.findall(text))
    return cjk / max(1, cjk + len(LATIN_WORD.findall(text)))


@cache
def trained_words() -> frozenset[str]:
    """The Latin words of the training answers: the demo has no business writing any other."""
    return frozenset(w.lower() for group in read_groups() for w in LATIN_WORD.findall(group["answer"]))


def failed_checks(question: dict, answer: str) -> list[str]:
    """The properties ``answer`` lacks, of those every answer to ``question`` must have (empty: it has them all).

    Every answer: not empty, no replacement character, in the question's language (zh: at least half of the word
    units CJK and no English prose words; en: no CJK character or full-width punctuation), with one of the
    question's ``expect`` keywords (what any on-topic answer names), no Latin word the training answers do not have
    (the broken words of a fragment). Greetings greet back; off-topic answers say
    they come from the demo and name ChatGLM-6B."""
    lang, failed = question["lang"], []
    if not answer.strip():
        return ["empty"]
    if "\ufffd" in answer:
        failed.append("replacement character")
    if lang == "zh" and (cjk_share(answer) < 0.5 or
                         ENGLISH_PROSE & {w.lower() for w in LATIN_WORD.findall(answer)}):
        failed.append("not Chinese")
    if lang == "en" and (CJK.search(answer) or re.search(r"[，。！？：；]", answer)):
        failed.append("not English")
    if {w.lower() for w in LATIN_WORD.findall(answer)} - trained_words():
        failed.append("made-up word")
    if not any(word in answer for word in question["expect"]):
        failed.append("expected keyword missing")
    if question["kind"] == "greeting" and not GREETING[lang].search(answer):
        failed.append("no greeting")
    if question["kind"] == "off-topic" and not ("ChatGLM-6B" in answer and DEMO[lang] in answer.lower()):
        failed.append("not honest about being the demo")
    return failed


def answer_all(bundle: Path, questions: list[dict]) -> list[dict]:
    """Each question with its greedy ``answer``, the wall time of that answer in ``seconds`` and its
    ``failed_checks``."""
    model = open_bundle(bundle)
    rules = RuleSet.load([DEFAULT_LIST])
    answered = []
    for question in questions:
        session = ChatSession(model.engine, model.tokenizer, Settings(), rules=rules, model_id=model.label)
        session.open(None, [tuple(turn) for turn in question["history"]])
        start = time.perf_counter()
        answer = "".join(session.send(question["query"], greedy=True))
        answered.append({**question, "answer": answer, "seconds": round(time.perf_counter() - start, 4),
                         "failed": failed_checks(question, answer)})
    return answered


def main(argv: list[str] | None = None) -> int:
    from model_export.export import export_bundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(HELD_OUT), default="dev", help="which list (default: dev)")
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--out", type=Path, help="write the answers as JSON here (default: print them)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "demo"
        export_bundle(args.checkpoint, bundle, quant=DEMO_QUANT, name="StreamChat demo model",
                      extra_manifest={"demo": True})
        answered = answer_all(bundle, read_heldout(args.set))
    text = json.dumps(answered, ensure_ascii=False, indent=1) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
