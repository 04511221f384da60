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
    and the plan says how much was dropped. The cost grows with what fits, not with the length of the conversation.
    """
    if not query.strip():
        raise PromptError("the message is empty: type a question first")
    room = context_budget - min(max_new_tokens, context_budget // 2)
    if room < 8:
        raise PromptError(f"a context budget of {context_budget} tokens is too small: raise it")
    if len(tokenizer.encode_prompt(query)) > room:
        return _plan_query_tail(tokenizer, query, len(history), room)
    kept = _newest_rounds_that_fit(tokenizer, query, history, room)
    while True:  # the count is exact for sentencepiece; checking the real prompt keeps the plan in the room regardless
        text = build_prompt(query, history[len(history) - kept:])
        ids = tokenizer.encode_prompt(text)
        if len(ids) <= room or kept == 0:
            break
        kept -= 1
    dropped = len(history) - kept
    notes = [f"left out the {dropped} oldest round(s) of this conversation to fit the context window"] if dropped else []
    return PromptPlan(ids=ids, text=text, dropped_rounds=dropped, notes=notes)


def _newest_rounds_that_fit(tokenizer: ChatGLMTokenizer, query: str, history: list[Turn], room: int) -> int:
    """How many of the newest rounds fit in ``room`` together with ``query`` (0 when even one does not).

    Counts the prompt ``build_prompt`` would make as the sum of its newline-ended segments (sentencepiece pieces never
    span the ``<n>`` piece, so each segment is tokenized on its own, after a newline), walking from the newest round
    back and stopping at the first that does not fit: each round is tokenized at most once, older ones never.
    With k rounds kept the labels are ``[Round 0]`` .. ``[Round k]`` (the last one the query's), so keeping one more
    round adds its text and the label ``[Round k+1]``.
    """
    newline = len(tokenizer.encode("\n"))

    def tokens_after_newline(text: str) -> int:
        return len(tokenizer.encode("\n" + text)) - newline

    used = len(tokenizer.encode_prompt("[Round 0]\n")) + tokens_after_newline(f"问：{query}\n答：")
    kept = 0
    for q, r in reversed(history):
        used += tokens_after_newline(f"[Round {kept + 1}]\n") + tokens_after_newline(f"问：{q}\n答：{r}\n")
        if used > room:
            break
        kept += 1
    return kept


def _plan_query_tail(tokenizer: ChatGLMTokenizer, query: str, rounds: int, room: int) -> PromptPlan:
    """The query alone does not fit: binary-search the longest character tail that does."""
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
    return PromptPlan(ids=tokenizer.encode_prompt(tail), text=tail, dropped_rounds=rounds,
                      query_chars_dropped=hi, notes=[note])
