"""A conversation as the user sees it: history in, filtered input, prompt within budget, filtered stream, history out.

The one pipeline every front end answers through: the desktop app, ``streamchat chat`` and ``streamchat generate`` (a
session without a history database, whose turns stay in memory). The user's message is stored before generation
starts, the answer once, when it completes or is stopped (with its stop reason), so a crash loses at most the answer
in flight.
A message the history cannot take (full disk, read-only folder) is kept in memory, stays part of the conversation and
is stored before the next one; the turn then ends with a HistoryError that says so.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from appliance.engines import Engine
from appliance.errors import StreamChatError
from appliance.generation import GenerationConfig, GenerationResult, StreamGenerator
from appliance.history import History, HistoryError, pair_turns
from appliance.prompt import Turn, plan_prompt
from appliance.safety import AuditLog, Match, RuleSet, StreamFilter
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
    settings: dict = field(default_factory=dict)  # the GenerationConfig the answer was sampled with
    deltas: list[str] = field(default_factory=list)  # the answer as it was shown, piece by piece
    user_message_id: int | None = None
    answer_message_id: int | None = None

    def to_dict(self) -> dict:
        """What ``streamchat generate --json`` prints: the model's ids, the shown (filtered) text, how it ended."""
        gen = self.generation or GenerationResult(prompt_ids=[])
        return {"prompt_ids": gen.prompt_ids, "token_ids": gen.token_ids, "response": self.response,
                "deltas": self.deltas, "stopped": self.stopped, "notes": self.notes, "settings": self.settings,
                "timings": gen.timings()}


@dataclass
class _Unsaved:
    """A message the history could not store yet; ``conversation`` is its id, or the draft token of a new one."""
    conversation: int | object
    role: str
    text: str
    fields: dict


class _LiveFilter:
    """The output filter of one answer, on the session's rules of the moment.

    When ``ChatSession.update`` has replaced the rules, the next delta scans the answer so far again with the new ones:
    text already shown stays shown (it cannot be taken back), text still held and everything after is filtered by the
    new rules (a listed word that started in shown text still has its remaining characters masked, or stops the answer).
    """

    def __init__(self, session: ChatSession, action: str) -> None:
        self.session, self.action = session, action
        self.rules = session.rules
        self.filter = StreamFilter(self.rules, action)
        self.shown = 0  # characters released so far
        self.earlier: list[Match] = []  # hits under rules that were since replaced

    def push(self, delta: str) -> str:
        rules = self.session.rules
        if rules is not self.rules:
            delta = "".join(self.filter.text) + delta
            self.earlier += self.filter.matches
            self.rules, self.filter = rules, StreamFilter(rules, self.action)
        return self._unseen(self.filter.push(delta))

    def finish(self) -> str:
        return self._unseen(self.filter.finish())

    def _unseen(self, released: str) -> str:
        """The part of what the filter released (one character per original character) not shown before."""
        start = self.filter.released - len(released)
        out = released[max(0, self.shown - start):]
        self.shown = max(self.shown, self.filter.released)
        return out

    @property
    def stopped(self) -> bool:
        return self.filter.stopped

    @property
    def matches(self) -> list[Match]:
        return list(dict.fromkeys(self.earlier + self.filter.matches))

    @property
    def text(self) -> str:
        return "".join(self.filter.text)


class ChatSession:
    """One conversation on one model. Settings and rules are the session's own: ``update`` replaces them."""

    def __init__(self, engine: Engine, tokenizer: ChatGLMTokenizer, settings: Settings, history: History | None = None,
                 rules: RuleSet | None = None, audit: AuditLog | None = None, model_id: str = "") -> None:
        self.engine, self.tokenizer, self.settings = engine, tokenizer, copy.deepcopy(settings)
        self.history, self.rules, self.audit, self.model_id = history, rules, audit, model_id
        self.conversation_id: int | None = None
        self._memory: list[tuple[str, str]] = []  # turns when there is no history database
        self._draft = object()  # stands for the current conversation until the history has created it
        self._unsaved: list[_Unsaved] = []  # in order; stored before any later message
        self._save_error: HistoryError | None = None
        self.last: TurnResult | None = None

    def update(self, settings: Settings | None = None, rules: RuleSet | None = None) -> None:
        """Make changed settings or safety rules current without reloading the model (None leaves one as it is).

        Safe to call from any thread, also while an answer streams: it only replaces references, which ``send`` reads
        at fixed points. The settings (a copy is kept, so later changes to the caller's object do not leak in) apply
        from the next ``send``: sampling, context budget, safety mode. The rules apply from the next delta of the
        answer in flight (text already shown stays shown) and to the next message's input check. The model, the
        history and the audit log stay; a changed data folder or model bundle needs a new session.
        """
        if settings is not None:
            self.settings = copy.deepcopy(settings)
        if rules is not None:
            self.rules = rules

    def open(self, conversation_id: int | None, turns: list[Turn] = ()) -> None:
        """Continue a stored conversation (None: the next message starts a new one). ``turns``: earlier turns of an
        unstored conversation, for a session without a history database (``streamchat generate --history``)."""
        if conversation_id is not None and self.history is not None:
            self.history.conversation(conversation_id)  # raises a clear error if it does not exist
        if turns and self.history is not None:
            raise ValueError("turns are given only to a session without a history database")
        self.conversation_id = conversation_id
        self._memory = list(turns)
        self._draft = object()

    def turns(self) -> list[tuple[str, str]]:
        if self.history is None:
            return list(self._memory)
        key = self._conversation_key()
        stored = self.history.messages(key) if isinstance(key, int) else []
        return pair_turns([(m.role, m.text) for m in stored] +
                          [(m.role, m.text) for m in self._unsaved if m.conversation == key])

    def send(self, query: str, cancel: threading.Event | None = None, greedy: bool = False,
             seed: int | None = None) -> Iterator[str]:
        """Yield the answer's text deltas; ``self.last`` holds the outcome when the iterator ends."""
        result = self.last = TurnResult(conversation_id=self.conversation_id)
        settings, rules = self.settings, self.rules  # this answer's (``update`` may replace them meanwhile)
        safety = settings.safety.mode
        if rules is not None and safety != "off":
            verdict = rules.verdict(query)
            if not verdict.allowed:
                if self.audit:
                    self.audit.record(rules.scan(query), "block", "input", query)
                result.stopped, result.blocked_reason = "blocked", verdict.reason
                return
        config = GenerationConfig.from_settings(settings.generation, greedy=greedy, seed=seed)
        result.settings = config.to_dict()
        budget = min(settings.context_budget, self.engine.max_context)
        plan = plan_prompt(self.tokenizer, query, self.turns(), budget, config.max_new_tokens, settings.system_prompt)
        result.notes = list(plan.notes)
        if self.history is not None:
            result.user_message_id = self._save("user", query, bundle_id=self.model_id)
            result.conversation_id = self.conversation_id
        gen = result.generation = GenerationResult(prompt_ids=plan.ids)
        filt = _LiveFilter(self, safety) if rules is not None and safety != "off" else None

        def show(text: str) -> str:
            result.response += text
            result.deltas.append(text)
            return text

        try:
            for delta in StreamGenerator(self.engine, self.tokenizer).stream(plan.ids, config, cancel, gen):
                shown = filt.push(delta) if filt else delta
                if shown:
                    yield show(shown)
                if filt and filt.stopped:
                    gen.stopped = "safety"
                    break
            tail = filt.finish() if filt else ""
            if tail:
                yield show(tail)
            if filt and filt.stopped:
                yield show(SAFETY_NOTICE)
        except StreamChatError:  # an engine failure: keep what was written, stored as stopped by an error
            gen.stopped = gen.stopped or "error"
            raise
        finally:
            result.stopped = gen.stopped or "cancelled"
            if filt and self.audit:
                self.audit.record(filt.matches, safety, "output", filt.text)
            self._store(query, result)
        if self._unsaved:
            raise self._unsaved_error()

    def _store(self, query: str, result: TurnResult) -> None:
        if self.history is not None:
            result.answer_message_id = self._save("assistant", result.response, bundle_id=self.model_id,
                                                  settings=result.settings, stop_reason=result.stopped,
                                                  timings=result.generation.timings())
        else:
            self._memory.append((query, result.response))

    def _conversation_key(self) -> int | object:
        return self.conversation_id if self.conversation_id is not None else self._draft

    def _save(self, role: str, text: str, **fields) -> int | None:
        """Store a message after the ones kept from earlier failures; its id, or None when the history failed (the
        message is then kept in memory with the others, so nothing typed or answered is lost while the app runs)."""
        self._unsaved.append(_Unsaved(self._conversation_key(), role, text, fields))
        try:
            return self._store_unsaved()
        except HistoryError as exc:
            self._save_error = exc
            return None

    def _store_unsaved(self) -> int | None:
        """Store the kept messages in order, creating a drafted conversation first; the last message's id."""
        message_id = None
        while self._unsaved:
            m = self._unsaved[0]
            if not isinstance(m.conversation, int):
                draft, created = m.conversation, self.history.new_conversation()
                for kept in self._unsaved:
                    kept.conversation = created if kept.conversation is draft else kept.conversation
                if self._draft is draft:
                    self.conversation_id = created
            message_id = self.history.add_message(m.conversation, m.role, m.text, **m.fields)
            self._unsaved.pop(0)
        return message_id

    @property
    def has_unsaved(self) -> bool:
        """Messages a storage failure left in memory, not yet in the history."""
        return bool(self._unsaved)

    def save_unsaved(self) -> None:
        """Before quitting: store the messages kept after a storage failure, or say in one line that they are lost."""
        if not self._unsaved:
            return
        try:
            self._store_unsaved()
        except HistoryError as exc:
            count = "1 message" if len(self._unsaved) == 1 else f"{len(self._unsaved)} messages"
            raise HistoryError(f"{exc.problem or exc}: {count} of this chat could not be saved") from exc

    def _unsaved_error(self) -> HistoryError:
        err, n = self._save_error, len(self._unsaved)
        problem, advice = (err.problem, err.advice) if err and err.problem else (str(err), "fix that")
        kept = "1 message is" if n == 1 else f"{n} messages are"
        return HistoryError(f"{problem}: {kept} not saved yet (kept in memory); {advice} and "
                            f"{'it is' if n == 1 else 'they are'} saved with the next message", problem, advice)

    def forget_from(self, message_id: int) -> None:
        """Drop a stored message and everything after it (regenerate, edit and resend)."""
        if self.history is not None:
            self.history.delete_from(message_id)

    def clear(self) -> None:
        """Start a new conversation; a stored one stays in the history."""
        self.open(None)
