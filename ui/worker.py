"""ChatWorker: loads the model and runs answers in its own QThread; the window and the worker talk by signals only.

The worker owns its snapshot of the app context (its own copy of the settings; the safety rules, history and audit
log it shares are never changed in place: a ``RuleSet`` is immutable, ``History`` keeps a connection per thread), the
model and the chat session. The window sends requests as queued signals and gets every result, timings included, as a
signal payload. Queued slots run one at a time, in the order they were sent: a request made while an answer streams
(new settings, reloaded safety lists) takes effect from the next answer. The window refuses a second send while an
answer is being written, so every send gets exactly one ``finished``.

The one object both threads touch is the ``cancel`` event the window passes in: the window sets it (Stop, Esc, close)
and clears it before a send, the worker only reads it between tokens, so an answer ends within one token.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, QThread, Signal, Slot

from appliance import crash
from appliance.app import AppContext
from appliance.engines import AUTO
from appliance.errors import EngineError, StreamChatError
from appliance.history import HistoryError
from appliance.live_numbers import AnswerClock, CountingAudit, measure
from appliance.loading import LoadedModel
from appliance.session import ChatSession, TurnResult
from appliance.settings import Settings

if TYPE_CHECKING:
    from ui.app import ModelLoader


def _opened_with(settings: Settings) -> tuple:
    """The settings the model is opened with: a change to any of them reopens it."""
    return (settings.model_bundle, settings.threads, settings.context_budget, settings.engine, settings.device,
            settings.device_id)


def _chosen_engine_failed(exc: BaseException, settings: Settings) -> bool:
    """Whether a failed load is down to the engine or device the settings chose: one of them is not the default
    (Automatic, CPU) and the engines refused (an engine that cannot run the bundle's target, a device it does not run
    on or that is not there, a runtime that is missing), not the bundle (not found, damaged), which no engine or
    device would change."""
    return isinstance(exc, EngineError) and (settings.engine != AUTO or settings.device != "cpu")


class ChatWorker(QObject):
    loading = Signal(str)  # what is being loaded
    loaded = Signal(str, dict)  # model label, bundle manifest summary
    started = Signal()
    delta = Signal(str)
    measured = Signal(object)  # the answer's AnswerNumbers (appliance.live_numbers), just before its ``finished``
    finished = Signal(object, float)  # TurnResult (the worker no longer touches it), seconds to the first shown text
    # a message a user can act on; True: they must (a load failed, messages not stored); True: a load failed on the
    # engine or device the settings chose
    failed = Signal(str, bool, bool)
    not_saved = Signal(str)  # on shutdown: messages of this chat that the history could not store are lost

    def __init__(self, app: AppContext, model_loader: ModelLoader, cancel: threading.Event) -> None:
        super().__init__()
        self.app = app  # the window's snapshot, sent to this worker and no longer changed there
        self.model_loader = model_loader
        self.cancel = cancel
        self.model: LoadedModel | None = None
        self.session: ChatSession | None = None

    @Slot()
    def load(self) -> None:
        """(Re)open the model with the current settings; the open conversation stays open."""
        try:
            self.loading.emit("")  # the window says a model is loading; the loader's progress says what
            self.model = self.model_loader(self.app.settings, self.loading.emit)
            self._start_session(self.session.conversation_id if self.session else None)
            settings = self.app.settings
            device = "cpu" if settings.device == "cpu" else f"{settings.device}:{settings.device_id}"
            self.loaded.emit(self.model.label, {**self.model.summary, "engine": self.model.engine.name, "device": device})
        except Exception as exc:  # engine crashes must reach the window, not kill the thread
            self.failed.emit(crash.one_line(exc, "loading the model"), True,
                             _chosen_engine_failed(exc, self.app.settings))

    def _start_session(self, conversation: int | None) -> None:
        self.session = self.app.session(self.model.engine, self.model.tokenizer, self.model.label)
        self.session.audit = CountingAudit(self.session.audit)  # the app's log; its hits counted for the live numbers
        self.session.open(conversation)

    @Slot(object)
    def configure(self, app: AppContext) -> None:
        """Take a new snapshot of the app context (new settings, reloaded safety lists): the next answer uses it, on
        the same model and session unless the bundle, thread count or context budget changed (the model is reopened)
        or the data folder moved (a new session on the history there, starting a new conversation)."""
        reopen = _opened_with(app.settings) != _opened_with(self.app.settings)
        moved = app.history is not self.app.history
        self.app = app
        if moved:
            self.session = None  # its conversations are in the old folder
        if self.session is not None:  # also before a reopen: should loading fail, the running chat still gets them
            self.session.update(settings=app.settings, rules=app.rules)
        if reopen:
            self.load()
        elif self.session is None and self.model is not None:
            self._start_session(None)

    @Slot(str, object)
    def send(self, text: str, replace_from: object = None) -> None:
        """Answer ``text``; ``replace_from`` (a message id) first forgets that message and all after it."""
        if self.session is None:
            self.finished.emit(TurnResult(stopped="error", blocked_reason="the model is not loaded"), 0.0)
            return
        session, earlier = self.session, self.session.last
        audit, failed = session.audit, False
        hits, clock = audit.hits, AnswerClock()
        try:
            if replace_from is not None:
                session.forget_from(int(replace_from))
            self.started.emit()
            for piece in session.send(text, self.cancel):
                clock.tick()
                self.delta.emit(piece)
        except Exception as exc:  # the conversation is kept; the window shows the line (a kiosk reloads the model)
            failed, line = True, crash.one_line(exc, "answering")
            self.failed.emit(line if crash.expected(exc) else f"{line}. The conversation is kept.",
                             isinstance(exc, HistoryError), False)
        result = session.last if session.last is not earlier else TurnResult(stopped="error")  # none: it failed first
        self.measured.emit(measure(text, result, clock, audit.hits - hits, failed))
        self.finished.emit(result, clock.first_token_s or 0.0)

    @Slot(object)
    def open_conversation(self, conversation_id: object) -> None:
        if self.session is not None:
            self.session.open(conversation_id if conversation_id is None else int(conversation_id))

    @Slot()
    def shut_down(self) -> None:
        """The last request before the window closes: store the messages a full disk refused (or say they are lost),
        then end this thread's event loop."""
        try:
            if self.session is not None:
                self.session.save_unsaved()
        except StreamChatError as exc:
            self.not_saved.emit(str(exc))
        finally:
            QThread.currentThread().quit()
