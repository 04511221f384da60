"""ChatWorker: loads the model and runs answers in its own QThread; the window only sees queued signals.

One answer at a time: a send while busy is refused with ``refused``, never queued silently. Stop sets a
``threading.Event`` that the generator checks between tokens, so an answer ends within one token.
"""

from __future__ import annotations

import threading
import time

from PySide6.QtCore import QObject, Signal, Slot

from appliance import crash
from appliance.app import AppContext
from appliance.session import ChatSession, TurnResult


class ChatWorker(QObject):
    loading = Signal(str)  # what is being loaded
    loaded = Signal(str, dict)  # model label, bundle manifest summary
    started = Signal()
    delta = Signal(str)
    finished = Signal(object)  # TurnResult
    failed = Signal(str)  # a message a user can act on
    refused = Signal(str)

    def __init__(self, app: AppContext, model_loader) -> None:
        super().__init__()
        self.app = app
        self.model_loader = model_loader  # callable(progress: Callable[[str], None]) -> LoadedModel
        self.session: ChatSession | None = None
        self.cancel = threading.Event()
        self.busy = threading.Lock()
        self.first_token_s = 0.0

    @Slot()
    def load(self) -> None:
        try:
            self.loading.emit("loading model...")
            model = self.model_loader(self.loading.emit)
            conversation = self.session.conversation_id if self.session else None
            self.session = ChatSession(model.engine, model.tokenizer, self.app.settings, self.app.history,
                                       self.app.rules, self.app.audit, model.label)
            self.session.open(conversation)
            self.loaded.emit(model.label, model.summary)
        except Exception as exc:  # engine crashes must reach the window, not kill the thread
            self.failed.emit(crash.one_line(exc, "loading the model"))

    def stop(self) -> None:
        """Called from the GUI thread: the answer ends before its next token."""
        self.cancel.set()

    @Slot(str, object)
    def send(self, text: str, replace_from: object = None) -> None:
        """Answer ``text``; ``replace_from`` (a message id) first forgets that message and all after it."""
        if self.session is None:
            self.refused.emit("the model is not loaded yet")
            return
        if not self.busy.acquire(blocking=False):
            self.refused.emit("an answer is still being written: stop it or wait")
            return
        try:
            self.cancel.clear()
            if replace_from is not None:
                self.session.forget_from(int(replace_from))
            self.started.emit()
            start, first = time.perf_counter(), None
            for piece in self.session.send(text, self.cancel):
                if first is None:
                    first = time.perf_counter() - start
                self.delta.emit(piece)
            self.first_token_s = first or 0.0
            self.finished.emit(self.session.last)
        except Exception as exc:  # the conversation is kept; the window shows the line (a kiosk reloads the model)
            line = crash.one_line(exc, "answering")
            self.failed.emit(line if crash.expected(exc) else f"{line}. The conversation is kept.")
            self.finished.emit(self.session.last or TurnResult(stopped="error"))
        finally:
            self.busy.release()

    @Slot(object)
    def open_conversation(self, conversation_id: object) -> None:
        if self.session is not None:
            self.session.open(conversation_id if conversation_id is None else int(conversation_id))
