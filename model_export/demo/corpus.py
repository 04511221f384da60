"""The demo model's training text: question/answer pairs about StreamChat in Chinese and English, expanded from groups.

``corpus.jsonl`` holds one group a line: ``{"topic", "lang", "queries": [...], "answer"}``, every query a phrasing of
the same question (help topics, greetings, thanks, off-topic questions, which all get the one honest answer), and
optionally ``"after": topic``, a follow-up that only makes sense as the second turn after that topic's question. The
examples are every phrasing once, plus, drawn with a fixed seed, some first questions after an unrelated first turn
(so an earlier turn does not derail the next answer) and some help questions after a greeting ("Hi, ...").

``paraphrases.jsonl`` holds more phrasings of the same groups (``{"topic", "lang", "queries"}``, with ``"after"`` for
second turns; the answer is the group's), written as users word their questions by writers who saw each topic's first
question and answer only: their own vocabulary, the symptom instead of the feature's name, context, tone. They join
their group's phrasings and are expanded with them.

``templates.json`` adds, for the help topics, greetings ("who are you", "what can you do" behind a greeting word),
second turns and off-topic questions, phrasings drawn from templates: shared question frames ("how can I", "is there a
way to", "能不能", "我想"...), synonyms per topic ("stop", "cancel", "interrupt"), polite openings, and surface noise
(lower case, no final punctuation, a swapped pair of letters). The hand-written phrasings teach what the answers are;
the templates teach that the frame and the synonym chosen do not change them, so questions worded unlike the help text
still land on their topic.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.jsonl"
TEMPLATES = HERE / "templates.json"
PARAPHRASES = HERE / "paraphrases.jsonl"
# the lists of questions the demo is judged on (model_export.demo.heldout); no training question may contain one
HELD_OUT = {name: HERE / f"{name}.jsonl" for name in ("dev", "test", "final", "fresh", "fifth", "sixth", "seventh", "eighth")}
SEED = 0
PER_PATTERN = 12  # phrasings drawn from each template (fewer when it has fewer distinct expansions)
LOWER_SHARE, BARE_SHARE, TYPO_SHARE = 0.15, 0.15, 0.08  # of the drawn phrasings: all lower case, no final mark, a typo
CHOICE = re.compile(r"\{([^{}]*)\}")
SECOND_TURN_SHARE = 0.3  # of the standalone phrasings, also asked after an unrelated first turn
GREETED_SHARE = 0.15  # of the help-topic phrasings, also asked with a greeting in front
GREETINGS = {"zh": ["你好，", "您好，", "嗨，"], "en": ["Hi, ", "Hello! ", "Hey, "]}
NOT_GREETED = {"greeting", "identity", "abilities", "thanks", "bye", "off-topic"}  # their phrasings are not help topics


def normalized(text: str) -> str:
    """Lower case, letters and digits only: punctuation, spaces and case do not make a question new."""
    return re.sub(r"[\W_]+", "", text.lower())


def held_out_questions() -> list[str]:
    """Every held-out question, ``normalized``."""
    return [normalized(json.loads(line)["query"]) for path in HELD_OUT.values()
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_groups(path: Path = CORPUS, more: Path | None = PARAPHRASES) -> list[dict]:
    """The groups of ``path``, each followed by the phrasings ``more`` holds for the same topic, language and first
    turn (its lines are groups without answers)."""
    groups = _json_lines(path)
    if more is not None:
        by_key = {(group["topic"], group["lang"], group.get("after")): group for group in groups}
        for extra in _json_lines(more):
            key = (extra["topic"], extra["lang"], extra.get("after"))
            if key not in by_key:
                raise ValueError(f"{more.name}: {path.name} has no group of topic {key[0]!r} ({key[1]}, after {key[2]!r})")
            group = by_key[key]
            group["queries"] += [query for query in extra["queries"] if query not in group["queries"]]
    return groups


def _first_turns(groups: list[dict]) -> dict[tuple[str, str], dict]:
    """(topic, lang) -> the standalone group that a follow-up on that topic comes after."""
    first: dict[tuple[str, str], dict] = {}
    for group in groups:
        if "after" not in group:
            first.setdefault((group["topic"], group["lang"]), group)
    return first


def _phrasings(group: dict, first: dict[tuple[str, str], dict]) -> list[dict]:
    """Every phrasing of ``group`` as an example; a follow-up after a question of its topic (taken in turn)."""
    before = first[group["after"], group["lang"]] if "after" in group else None
    return [{"history": [[before["queries"][i % len(before["queries"])], before["answer"]]] if before else [],
             "query": query, "answer": group["answer"]} for i, query in enumerate(group["queries"])]


def first_phrasings(path: Path = CORPUS) -> list[dict]:
    """The first phrasing of each group: the examples the trainer and the tests check the learnt answers on."""
    groups = read_groups(path)
    first = _first_turns(groups)
    return [_phrasings(group, first)[0] for group in groups]


def _draw(pattern: str, frames: dict[str, str], rng: random.Random) -> str:
    """One expansion of ``pattern``: each ``{FRAME}`` becomes that frame's choices, each ``{a|b}`` one choice."""
    text = CHOICE.sub(lambda m: "{" + frames[m.group(1)] + "}" if m.group(1) in frames else m.group(0), pattern)
    text = CHOICE.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    return re.sub(r"\s+([?.!,，？。！])", r"\1", re.sub(r"\s{2,}", " ", text)).strip(" ,")


def _noisy(text: str, lang: str, rng: random.Random) -> str:
    """``text`` as people type it: sometimes all lower case, without its final mark, or (English) with a typo."""
    if lang == "en":
        text = text[0].upper() + text[1:]
        if rng.random() < LOWER_SHARE:
            text = text.lower()
        words = text.split(" ")
        long = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
        if long and rng.random() < TYPO_SHARE:
            i = rng.choice(long)
            j = rng.randrange(1, len(words[i]) - 2)
            words[i] = words[i][:j] + words[i][j + 1] + words[i][j] + words[i][j + 2:]
            text = " ".join(words)
    if rng.random() < BARE_SHARE:
        text = text.rstrip("?.!？。！")
    return text


def templated(groups: list[dict], path: Path = TEMPLATES) -> list[dict]:
    """Examples drawn with a fixed seed from ``templates.json``: each template's distinct expansions (at most
    ``PER_PATTERN``), with the answer of its topic; a second turn after a phrasing of its ``after`` topic."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    first = _first_turns(groups)
    seen = {query for group in groups for query in group["queries"]}
    rng = random.Random(SEED)
    examples = []
    for entry in spec["groups"]:
        lang, answer = entry["lang"], first[entry["topic"], entry["lang"]]["answer"]
        before = first[entry["after"], lang] if "after" in entry else None
        for pattern in entry["patterns"]:
            drawn = []
            for _ in range(20 * PER_PATTERN):
                query = _noisy(_draw(pattern, spec["frames"][lang], rng), lang, rng)
                if query not in seen:
                    seen.add(query)
                    drawn.append(query)
                if len(drawn) == PER_PATTERN:
                    break
            examples += [{"history": [[rng.choice(before["queries"]), before["answer"]]] if before else [],
                          "query": query, "answer": answer} for query in drawn]
    return examples


def read_corpus(path: Path = CORPUS) -> list[dict]:
    """Each example: ``{"history": [[q, a], ...], "query": str, "answer": str}``; the same list on every call."""
    held_out = held_out_questions()
    groups = read_groups(path)
    for group in groups:  # a held-out question is neither asked nor drawn as an earlier turn
        group["queries"] = [query for query in group["queries"] if not _contains_any(query, held_out)]
        if not group["queries"]:
            raise ValueError(f"every phrasing of {group['topic']!r} ({group['lang']}) contains a held-out question")
    first = _first_turns(groups)
    examples = [example for group in groups for example in _phrasings(group, first)]
    rng = random.Random(SEED)
    for group in groups:
        if "after" in group:
            continue
        others = [g for g in first.values() if g["lang"] == group["lang"] and g["topic"] != group["topic"]]
        for query in group["queries"]:
            if rng.random() < SECOND_TURN_SHARE:
                other = rng.choice(others)
                examples.append({"history": [[rng.choice(other["queries"]), other["answer"]]], "query": query,
                                 "answer": group["answer"]})
            if group["topic"] not in NOT_GREETED and rng.random() < GREETED_SHARE:
                examples.append({"history": [], "query": rng.choice(GREETINGS[group["lang"]]) + query,
                                 "answer": group["answer"]})
    # the templates' frames and openings can rebuild a held-out question inside a longer one; such draws are dropped
    return [example for example in examples + templated(groups) if not _contains_any(example["query"], held_out)]


def _contains_any(query: str, questions: list[str]) -> bool:
    text = normalized(query)
    return any(question in text for question in questions)
