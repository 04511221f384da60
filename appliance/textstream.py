"""Generated ids -> clean text deltas whose concatenation is exactly ``process_response(full decode)``.

A delta never shows U+FFFD from a multi-byte character split across tokens, never an ASCII ``, ! : ; ?`` that a
following CJK character would turn full-width, never whitespace that ``strip()`` would drop at the end, and never a
partial ``[[训练时间]]`` marker or ``<|blank_N|>`` markup. Everything held back is released as soon as the next text decides it.
"""

from __future__ import annotations

import re

from appliance.tokenizer import ChatGLMTokenizer

_PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
_CJK = "\u4e00-\u9fff"
_TRAINING_TIME = "[[训练时间]]"
_LONGEST_MARKUP = len("<|blank_80|>")


def process_response(text: str) -> str:
    """THUDM's post-processing of an answer: strip, the training-time marker, full-width punctuation next to CJK."""
    text = text.strip().replace(_TRAINING_TIME, "2023年")
    for half, full in _PUNCT:
        mark = re.escape(half)
        text = re.sub(f"([{_CJK}]){mark}", rf"\1{full}", text)
        text = re.sub(f"{mark}([{_CJK}])", rf"{full}\1", text)
    return text


def stable_length(text: str) -> int:
    """Length of the prefix of ``text`` that no later text can change under ``process_response``."""
    end = len(text)
    while True:
        cut = _held_tail(text, end)
        if cut == end:
            return end
        end = cut


def _held_tail(text: str, end: int) -> int:
    """``end`` moved back past one tail that may still change (each rule applied once; the caller repeats)."""
    while end and (text[end - 1] == "\ufffd" or text[end - 1].isspace() or text[end - 1] in ",!:;?"):
        end -= 1
    for cut in range(min(len(_TRAINING_TIME) - 1, end), 0, -1):
        if text[end - cut:end] == _TRAINING_TIME[:cut]:
            return end - cut
    opening = text.rfind("<", max(0, end - _LONGEST_MARKUP), end)
    if opening >= 0 and ">" not in text[opening:end]:
        return opening  # may still become <n>, <|tab|> or <|blank_N|> when pieces spell it out
    return end


class TextStream:
    """Feed generated token ids one at a time; get the text each one makes final."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # everything released so far

    def push(self, token_id: int) -> str:
        """The new final text after ``token_id`` (often empty while text is held back)."""
        self.ids.append(token_id)
        raw = self.tokenizer.decode(self.ids)
        return self._advance(process_response(raw[: stable_length(raw)]))

    def finish(self) -> str:
        """Release what was held back; afterwards ``text == process_response(decode(ids))``."""
        return self._advance(process_response(self.tokenizer.decode(self.ids)))

    def _advance(self, final_prefix: str) -> str:
        if not final_prefix.startswith(self.text):
            # Cannot happen for sentencepiece decodes (prefix-stable); never show text that later disappears.
            raise AssertionError(f"text stream diverged: {self.text!r} is not a prefix of {final_prefix!r}")
        delta = final_prefix[len(self.text):]
        self.text = final_prefix
        return delta
