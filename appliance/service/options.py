"""Per-request generation options, checked against the settings schema, and the WebSocket chat frame.

A request may set any setting of the schema's ``generation`` section by its name (temperature, top_p, top_k,
repetition_penalty, max_new_tokens) for its own answer; the limits are the settings file's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import StreamChatError
from appliance.settings import Settings, section, with_values

MAX_ID = 2**63 - 1


class RequestError(StreamChatError):
    """A request the server cannot take as sent: the message says which field and why (HTTP 400)."""


def malformed(exc: ValueError | RecursionError) -> str:
    """What is wrong with a JSON text json.loads refused."""
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def generation_settings(base: Settings, options: dict[str, Any]) -> Settings:
    """``base`` with the generation options given in ``options`` (None: the saved setting)."""
    given = {}
    for setting in section("generation"):
        value = options.get(setting.name)
        if value is not None:
            try:
                given[setting.key] = setting.check(value, setting.name)
            except StreamChatError as exc:
                raise RequestError(str(exc)) from exc
    return with_values(base, given)


def whole_number(value: Any, name: str, low: int = 0, high: int = MAX_ID) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{name} must be a whole number from {low} to {high}, got {json.dumps(value)[:40]}")
    return value


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {json.dumps(value)[:40]}")
    return value


def message_text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise RequestError(f"{name} has {len(value)} characters; the limit is {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800"): neither the tokenizer nor SQLite takes it
        raise RequestError(f"{name} is not valid Unicode: a lone surrogate at character {exc.start}") from None
    return value


@dataclass(frozen=True)
class ChatFrame:
    """A WebSocket client frame: a message to answer, or ``stop``."""

    stop: bool = False
    text: str = ""
    conversation_id: int | None = None
    greedy: bool = False
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


FRAME_FIELDS = ("type", "text", "conversation_id", "greedy", "seed", *(s.name for s in section("generation")))


def chat_frame(raw: str, limit: int) -> ChatFrame:
    """A text frame: a JSON object ({"text": ...} or {"type": "stop"}), or any other text as the message itself.

    Text that starts with ``{`` but is not valid JSON is an error rather than a message, so a client's broken JSON
    is reported instead of being answered. Unknown fields are ignored.
    """
    if not raw.lstrip().startswith("{"):
        return ChatFrame(text=message_text(raw, "the message", limit))
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser's recursion limit
        raise RequestError(f"malformed JSON: {malformed(exc)}") from exc
    if not isinstance(data, dict):
        raise RequestError("a JSON frame must be an object")
    kind = data.get("type", "message")
    if kind == "stop":
        return ChatFrame(stop=True)
    if kind != "message":
        raise RequestError(f"unknown frame type {json.dumps(kind)[:40]}: send \"message\" (the default) or \"stop\"")
    if "text" not in data:
        raise RequestError("the frame has no \"text\"")
    conversation = data.get("conversation_id")
    seed = data.get("seed")
    return ChatFrame(text=message_text(data["text"], "text", limit),
                     conversation_id=None if conversation is None else whole_number(conversation, "conversation_id", 1),
                     greedy=flag(data.get("greedy", False), "greedy"),
                     seed=None if seed is None else whole_number(seed, "seed"),
                     options={k: data[k] for k in FRAME_FIELDS if k in data})
