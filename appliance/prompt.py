"""ChatGLM-6B's chat prompt and the policy that fits a long conversation into the context window."""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.errors import PromptError
from appliance.tokenizer import ChatGLMTokenizer

Turn = tuple[str, str]  # (query, response)


def build_prompt(query: str, history: list[Turn]) -> str:
    """The bare query on the first turn, ``[Round i]\\n问：q\\n答：r\\n`` per past turn after that (as ``chat()``)."""
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
                max_new_tokens: int) -> PromptPlan:
    """Fit ``query`` and as much recent history as possible into the budget, leaving room for the answer.

    The room kept for the answer is ``max_new_tokens`` but at most half the budget (a 512-token answer limit must not
    leave a 512-token model no room for a question; such an answer may then end with stop reason ``context``).
    Oldest whole rounds are dropped first; if the query alone is too long, its tail is kept (cut between characters)
    and the plan says how much was dropped.
    """
    if not query.strip():
        raise PromptError("the message is empty: type a question first")
    room = context_budget - min(max_new_tokens, context_budget // 2)
    if room < 8:
        raise PromptError(f"a context budget of {context_budget} tokens is too small: raise it")
    for dropped in range(len(history) + 1):
        text = build_prompt(query, history[dropped:])
        ids = tokenizer.encode_prompt(text)
        if len(ids) <= room:
            notes = [f"left out the {dropped} oldest round(s) of this conversation to fit the context window"] \
                if dropped else []
            return PromptPlan(ids=ids, text=text, dropped_rounds=dropped, notes=notes)
    # The query alone does not fit: binary-search the longest character tail that does.
    lo, hi = 0, len(query)  # dropping lo characters is too few; dropping hi is enough
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokenizer.encode_prompt(query[mid:])) <= room:
            hi = mid
        else:
            lo = mid
    tail = query[hi:]
    note = (f"your message was too long for the context window: only its last {len(tail)} of {len(query)} "
            f"characters were sent")
    return PromptPlan(ids=tokenizer.encode_prompt(tail), text=tail, dropped_rounds=len(history),
                      query_chars_dropped=hi, notes=[note])
