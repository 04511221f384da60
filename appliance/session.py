"""A conversation as the user sees it: history in, filtered input, prompt within budget, filtered stream, history out.

Used by the terminal chat and the desktop app alike. The user's message is stored before generation starts, the
answer once, when it completes or is stopped (with its stop reason), so a crash loses at most the answer in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from appliance.engines import Engine
from appliance.errors import StreamChatError
from appliance.generation import GenerationResult, StreamGenerator
from appliance.history import History
from appliance.prompt import plan_prompt
from appliance.safety import AuditLog, RuleSet, StreamFilter
from appliance.settings import Settings
from appliance.tokenizer import ChatGLMTokenizer

SAFETY_NOTICE = "［回答已被安全策略终止 / answer stopped by the safety policy］"


@dataclass
class TurnResult:
    conversation_id: int | None = None
    response: str = ""
    stopped: str = ""  # eos | max_new_tokens | context | cancelled | safety | blocked | error
    blocked_reason: str = ""
    notes: list[str] = field(default_factory=list)
    generation: GenerationResult | None = None
    user_message_id: int | None = None
    answer_message_id: int | None = None


class ChatSession:
    def __init__(self, engine: Engine, tokenizer: ChatGLMTokenizer, settings: Settings, history: History | None = None,
                 rules: RuleSet | None = None, audit: AuditLog | None = None, model_id: str = "") -> None:
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.history, self.rules, self.audit, self.model_id = history, rules, audit, model_id
        self.conversation_id: int | None = None
        self._memory: list[tuple[str, str]] = []  # turns when there is no history database
        self.last: TurnResult | None = None

    def open(self, conversation_id: int | None) -> None:
        """Continue a stored conversation (None: the next message starts a new one)."""
        if conversation_id is not None and self.history is not None:
            self.history.conversation(conversation_id)  # raises a clear error if it does not exist
        self.conversation_id = conversation_id
        self._memory = []

    def turns(self) -> list[tuple[str, str]]:
        if self.history is not None and self.conversation_id is not None:
            return self.history.turns(self.conversation_id)
        return list(self._memory)

    def send(self, query: str, cancel: threading.Event | None = None, greedy: bool = False,
             seed: int | None = None) -> Iterator[str]:
        """Yield the answer's text deltas; ``self.last`` holds the outcome when the iterator ends."""
        result = self.last = TurnResult(conversation_id=self.conversation_id)
        safety = self.settings.safety.mode
        if self.rules is not None and safety != "off":
            verdict = self.rules.verdict(query)
            if not verdict.allowed:
                if self.audit:
                    self.audit.record(self.rules.scan(query), "block", "input", query)
                result.stopped, result.blocked_reason = "blocked", verdict.reason
                return
        config = self.settings.generation.config(greedy=greedy, seed=seed)
        budget = min(self.settings.context_budget, self.engine.max_context)
        plan = plan_prompt(self.tokenizer, query, self.turns(), budget, config.max_new_tokens)
        result.notes = list(plan.notes)
        if self.history is not None:
            if self.conversation_id is None:
                self.conversation_id = self.history.new_conversation()
            result.conversation_id = self.conversation_id
            result.user_message_id = self.history.add_message(self.conversation_id, "user", query,
                                                              bundle_id=self.model_id)
        gen = result.generation = GenerationResult(prompt_ids=plan.ids)
        filt = StreamFilter(self.rules, action=safety) if self.rules is not None and safety != "off" else None
        try:
            for delta in StreamGenerator(self.engine, self.tokenizer).stream(plan.ids, config, cancel, gen):
                shown = filt.push(delta) if filt else delta
                if shown:
                    result.response += shown
                    yield shown
                if filt and filt.stopped:
                    gen.stopped = "safety"
                    break
            if filt and not filt.stopped:
                tail = filt.finish()
                result.response += tail
                if tail:
                    yield tail
            if filt and filt.stopped:
                result.response += SAFETY_NOTICE
                yield SAFETY_NOTICE
        except StreamChatError:  # an engine failure: keep what was written, stored as stopped by an error
            gen.stopped = gen.stopped or "error"
            raise
        finally:
            result.stopped = gen.stopped or "cancelled"
            if filt and self.audit:
                self.audit.record(filt.matches, safety, "output", "".join(filt.text))
            self._store(query, result, config.to_dict())

    def _store(self, query: str, result: TurnResult, config: dict) -> None:
        gen = result.generation
        timings = {"prefill_ms": gen.prefill_ms, "decode_ms_per_token": gen.decode_ms_per_token,
                   "tokens": len(gen.token_ids)} if gen else None
        if self.history is not None and self.conversation_id is not None:
            result.answer_message_id = self.history.add_message(
                self.conversation_id, "assistant", result.response, bundle_id=self.model_id, settings=config,
                stop_reason=result.stopped, timings=timings)
        else:
            self._memory.append((query, result.response))

    def forget_from(self, message_id: int) -> None:
        """Drop a stored message and everything after it (regenerate, edit and resend)."""
        if self.history is not None:
            self.history.delete_from(message_id)

    def clear(self) -> None:
        """Start a new conversation; a stored one stays in the history."""
        self.open(None)
