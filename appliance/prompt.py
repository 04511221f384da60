"""ChatGLM-6B's chat prompt and the policy that fits a long conversation into the context window.

ChatGLM-6B has no system role. A system prompt enters as the conversation's first round, the instruction as the
question and a short acknowledgement as the answer (``system_turn``); it stays first, it counts against the context
budget, and fitting a long conversation leaves out the oldest rounds after it, never it. Every front end (the window,
the terminal chat, the service's WebSocket and OpenAI routes) builds its prompt here, so all use this one definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from appliance.errors import PromptError
from appliance.tokenizer import ChatGLMTokenizer

Turn = tuple[str, str]  # (query, response)


def system_turn(system: str) -> Turn:
    """The round a system prompt becomes: the instruction, then the model agreeing to it, in the instruction's script
    (Chinese if it has a CJK character, English otherwise), so an English instruction does not pull answers into
    Chinese."""
    return system, "好的。" if re.search(r"[\u3400-\u9fff\uf900-\ufaff]", system) else "OK."


def _pinned(system: str) -> list[Turn]:
    """The rounds that are never left out: the system prompt's, when there is one."""
    return [system_turn(system.strip())] if system.strip() else []


def build_prompt(query: str, history: list[Turn], system: str = "") -> str:
    """The bare query on the first turn, ``[Round i]\\n问：q\\n答：r\\n`` per past turn after that (as ``chat()``);
    a ``system`` prompt is round 0 (``system_turn``)."""
    history = [*_pinned(system), *history]
    if not history:
        return query
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return f"{rounds}[Round {len(history)}]\n问：{query}\n答："


@dataclass(frozen=True)
class PromptPlan:
    """What will be sent: the ids, the prompt text, and what had to be left out to fit (never silently)."""

    ids: list[int]
    text: str
    dropped_rounds: int = 0
    query_chars_dropped: int = 0
    notes: list[str] = field(default_factory=list)


def plan_prompt(tokenizer: ChatGLMTokenizer, query: str, history: list[Turn], context_budget: int,
                max_new_tokens: int, system: str = "") -> PromptPlan:
    """Fit ``query`` and as much recent history as possible into the budget, leaving room for the answer.

    The room kept for the answer is ``max_new_tokens`` but at most half the budget (a 512-token answer limit must not
    leave a 512-token model no room for a question; such an answer may then end with stop reason ``context``).
    A ``system`` prompt is always kept (a PromptError says so when it leaves no room for a question). Oldest whole
    rounds are dropped first; if the query alone is too long, its tail is kept (cut between characters) and the plan
    says how much was dropped. The cost grows with what fits, not with the length of the conversation.
    """
    if not query.strip():
        raise PromptError("the message is empty: type a question first")
    room = context_budget - min(max_new_tokens, context_budget // 2)
    if room < 8:
        raise PromptError(f"a context budget of {context_budget} tokens is too small: raise it")
    if len(tokenizer.encode_prompt(build_prompt(query[-1:], [], system))) > room:
        raise PromptError(f"the system prompt leaves no room for a question in a context budget of {context_budget} "
                          "tokens: shorten it in Settings or raise the budget")
    if len(tokenizer.encode_prompt(build_prompt(query, [], system))) > room:
        return _plan_query_tail(tokenizer, query, len(history), room, system)
    kept = _newest_rounds_that_fit(tokenizer, query, history, room, system)
    while True:  # the count is exact for sentencepiece; checking the real prompt keeps the plan in the room regardless
        text = build_prompt(query, history[len(history) - kept:], system)
        ids = tokenizer.encode_prompt(text)
        if len(ids) <= room or kept == 0:
            break
        kept -= 1
    dropped = len(history) - kept
    notes = [f"left out the {dropped} oldest round(s) of this conversation to fit the context window"] if dropped else []
    return PromptPlan(ids=ids, text=text, dropped_rounds=dropped, notes=notes)


def _newest_rounds_that_fit(tokenizer: ChatGLMTokenizer, query: str, history: list[Turn], room: int,
                            system: str) -> int:
    """How many of the newest rounds fit in ``room`` together with ``query`` and the system round (0 when even one
    does not).

    Counts the prompt ``build_prompt`` would make as the sum of its newline-ended segments (sentencepiece pieces never
    span the ``<n>`` piece, so each segment is tokenized on its own, after a newline), walking from the newest round
    back and stopping at the first that does not fit: each round is tokenized at most once, older ones never.
    With p pinned rounds and k rounds kept the labels are ``[Round 0]`` .. ``[Round p+k]`` (the last one the query's),
    so keeping one more round adds its text and one more label.
    """
    newline = len(tokenizer.encode("\n"))

    def tokens_after_newline(text: str) -> int:
        return len(tokenizer.encode("\n" + text)) - newline

    used, labels = len(tokenizer.encode_prompt("[Round 0]\n")) + tokens_after_newline(f"问：{query}\n答："), 1
    for q, r in _pinned(system):
        used += tokens_after_newline(f"[Round {labels}]\n") + tokens_after_newline(f"问：{q}\n答：{r}\n")
        labels += 1
    kept = 0
    for q, r in reversed(history):
        used += tokens_after_newline(f"[Round {labels + kept}]\n") + tokens_after_newline(f"问：{q}\n答：{r}\n")
        if used > room:
            break
        kept += 1
    return kept


def _plan_query_tail(tokenizer: ChatGLMTokenizer, query: str, rounds: int, room: int, system: str) -> PromptPlan:
    """The query alone (after the system round) does not fit: binary-search the longest character tail that does."""
    lo, hi = 0, len(query) - 1  # dropping lo characters is too few; dropping hi (all but the last) is enough
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokenizer.encode_prompt(build_prompt(query[mid:], [], system))) <= room:
            hi = mid
        else:
            lo = mid
    tail = query[hi:]
    note = (f"your message was too long for the context window: only its last {len(tail)} of {len(query)} "
            f"characters were sent")
    text = build_prompt(tail, [], system)
    return PromptPlan(ids=tokenizer.encode_prompt(text), text=text, dropped_rounds=rounds,
                      query_chars_dropped=hi, notes=[note])
