"""The OpenAI chat-completions format: a request's ``messages`` as ChatGLM's history, answers as OpenAI objects.

ChatGLM-6B's prompt is rounds of (query, response) plus the new query, so:
- user and assistant messages pair into rounds in order; consecutive messages of one role are joined by a blank line;
  an assistant message with no user message before it is a round with an empty query;
- the last message must be the user's: it is the query;
- ChatGLM-6B has no system role: the texts of the ``system`` (or ``developer``) messages, in order and joined by a
  blank line, are the request's system prompt, which replaces the configured one and enters the prompt as every front
  end's does (``appliance.prompt.system_turn``: the first round, kept when older rounds are left out to fit).
ChatGLM-6B has no tools: ``tool`` and ``function`` messages are left out. Parameters OpenAI defines that ChatGLM cannot
honour (``stop``, penalties, ``logit_bias``, tools...) and unknown ones are ignored; the ones used are checked and a
bad value is a 400.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from appliance.prompt import Turn
from appliance.service.options import RequestError, flag, message_text, whole_number
from appliance.session import TurnResult

ROLES = ("system", "developer", "user", "assistant")
IGNORED_ROLES = ("tool", "function")  # tool results: ChatGLM-6B has no tools (tool parameters are ignored too)
FINISH = {"eos": "stop", "cancelled": "stop", "max_new_tokens": "length", "context": "length",
          "safety": "content_filter", "blocked": "content_filter"}


@dataclass(frozen=True)
class CompletionRequest:
    query: str
    turns: tuple[Turn, ...]
    system: str | None  # the system messages' text; None: the request has none (the configured system prompt applies)
    stream: bool
    include_usage: bool
    greedy: bool
    seed: int | None
    options: dict[str, Any]  # generation settings by schema name


def _content(message: dict, where: str, limit: int) -> str:
    """A message's text: a string, or a list of text parts (other parts, e.g. images, are refused)."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"{where}.content[{i}] must be a text part ({{\"type\": \"text\", \"text\": ...}})")
            texts.append(part["text"])
        content = "\n".join(texts)
    return message_text(content, f"{where}.content", limit)


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise RequestError(f"{name} must be a number, got {json.dumps(value)[:40]}")
    return value


def parse_request(body: Any, limit: int) -> CompletionRequest:
    """The request body (parsed JSON) as a query, history and options; RequestError names what is wrong."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    system, spoken = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if isinstance(message, dict) and message.get("role") in IGNORED_ROLES:
            continue
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"{where} must be an object whose role is one of {', '.join(ROLES)}")
        text = _content(message, where, limit)
        if message["role"] in ("system", "developer"):
            system.append(text)
        elif spoken and spoken[-1][0] == message["role"]:
            spoken[-1] = (message["role"], f"{spoken[-1][1]}\n\n{text}")
        else:
            spoken.append((message["role"], text))
    if not spoken or spoken[-1][0] != "user":
        raise RequestError("the last message (other than system messages) must be from the user")
    turns, pending = [], None
    for role, text in spoken[:-1]:
        if role == "user":
            pending = text
        else:
            turns.append((pending or "", text))
            pending = None
    query = spoken[-1][1]
    if not query.strip():
        raise RequestError("the last user message is empty")

    temperature = _number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise RequestError(f"temperature must be 0 or more, got {temperature}")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    options = {"temperature": temperature or None, "top_p": _number(body, "top_p"), "max_new_tokens": max_tokens,
               "top_k": body.get("top_k"), "repetition_penalty": _number(body, "repetition_penalty")}
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise RequestError(f"n must be 1: one answer per request, got {json.dumps(n)[:40]}")
    stream_options = body.get("stream_options")
    if stream_options is None:
        stream_options = {}
    elif not isinstance(stream_options, dict):
        raise RequestError("stream_options must be an object")
    seed = body.get("seed")
    return CompletionRequest(
        query=query, turns=tuple(turns), system="\n\n".join(system) if system else None,
        stream=flag(body.get("stream", False), "stream"),
        include_usage=flag(stream_options.get("include_usage", False), "stream_options.include_usage"),
        greedy=temperature == 0, seed=None if seed is None else whole_number(seed, "seed"), options=options)


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage(result: TurnResult | None) -> dict:
    gen = result.generation if result is not None else None
    prompt, completion = (len(gen.prompt_ids), len(gen.token_ids)) if gen is not None else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(result: TurnResult | None) -> str:
    return FINISH.get(result.stopped if result is not None else "", "stop")


def completion(ident: str, model: str, result: TurnResult) -> dict:
    """The non-streaming answer."""
    return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.response},
                         "logprobs": None, "finish_reason": finish_reason(result)}],
            "usage": usage(result)}


def chunk(ident: str, model: str, delta: dict, finish: str | None = None, usage_: dict | None = None) -> str:
    """One server-sent event of a streamed answer; ``usage_`` makes it the usage chunk (no choices)."""
    body: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model}
    if usage_ is not None:
        body.update(choices=[], usage=usage_)
    else:
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
