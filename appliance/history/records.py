"""What the history stores and how it fails, shared by every backend: messages, conversations, ``HistoryError``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from appliance.errors import StreamChatError

SCHEMA_VERSION = 2
ROLES = ("user", "assistant")
STOP_REASONS = ("", "eos", "max_new_tokens", "context", "cancelled", "safety", "blocked", "error")
NEW_TITLE = "New conversation"

# what a failed call could not do, ending its error message
OPENING, READING = "the history cannot be opened", "the history cannot be read"
SAVING, CHANGING = "nothing was saved", "nothing was changed"


class HistoryError(StreamChatError):
    """The history database cannot be used; it is never overwritten.

    When storage failed, ``problem`` says what is wrong (e.g. "the disk holding ... is full") and ``advice`` what the
    user can do about it, so that a caller keeping unsaved messages can word its own message around them.
    """

    def __init__(self, message: str, problem: str = "", advice: str = "") -> None:
        super().__init__(message)
        self.problem, self.advice = problem, advice


def storage_error(problem: str, advice: str, outcome: str) -> HistoryError:
    """The one line every backend gives for a storage failure: what is wrong, what was not done, what to do."""
    return HistoryError(f"{problem}: {outcome}; {advice} and try again", problem=problem, advice=advice)


def pair_turns(messages: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(query, answer) pairs from (role, text) in order; a user message whose answer never arrived is skipped."""
    pairs, pending = [], None
    for role, text in messages:
        if role == "user":
            pending = text
        elif pending is not None:
            pairs.append((pending, text))
            pending = None
    return pairs


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str  # user | assistant
    text: str
    created: float
    bundle_id: str = ""
    settings: dict | None = None
    stop_reason: str = ""
    timings: dict | None = None


@dataclass
class Conversation:
    id: int
    title: str
    created: float
    updated: float
    messages: int = 0


# A message row as every query selects it, in this order (``message_from_row``).
MESSAGE_COLUMNS = ("id", "conversation_id", "role", "text", "created", "bundle_id", "settings", "stop_reason", "timings")


def message_columns(table: str = "") -> str:
    """``MESSAGE_COLUMNS`` for a SELECT list, qualified by ``table`` where a join needs it."""
    return ", ".join(f"{table}.{c}" if table else c for c in MESSAGE_COLUMNS)


def message_from_row(row: Sequence) -> Message:
    """A ``Message`` from a row selected as ``message_columns()``; settings and timings are stored as JSON text."""
    mid, cid, role, text, created, bundle_id, settings, stop_reason, timings = row
    return Message(int(mid), int(cid), role, text, float(created), bundle_id, json.loads(settings) if settings else None,
                   stop_reason, json.loads(timings) if timings else None)


def json_or_null(value: dict | None) -> str | None:
    """Settings and timings as stored: JSON text, or NULL for none."""
    return json.dumps(value) if value else None
