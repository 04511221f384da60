"""The chat window: conversation sidebar, transcript, composer, status bar; kiosk mode for unattended boards.

The window talks to its ChatWorker (another thread) by signals only (see ui.worker): it sends copies of what it
changes (settings, the safety rules after a reload) and never reads or writes the worker's attributes.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

from PySide6.QtCore import QCoreApplication, QEvent, QObject, Qt, QThread, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMenu,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from appliance.app import AppContext
from appliance.display import one_line
from appliance.errors import StreamChatError
from appliance.history import write_export
from appliance.live_numbers import AnswerNumbers, RunNumbers, tokens_per_second
from appliance.session import TurnResult
from appliance.settings import with_values
from ui.alerts import alert
from ui.menus import KIOSK_ACTION, build_menus
from ui.messages import MessageView, Transcript, t
from ui.progress import ProgressLine
from ui.theme import app_icon, apply_theme
from ui.worker import ChatWorker


class Composer(QPlainTextEdit):
    """Enter sends, Shift+Enter is a new line, Esc stops the answer."""

    submitted = Signal()
    stop_requested = Signal()

    def keyPressEvent(self, event) -> None:  # noqa: N802 - Qt override
        if event.key() in (Qt.Key_Return, Qt.Key_Enter) and not event.modifiers() & Qt.ShiftModifier:
            self.submitted.emit()
        elif event.key() == Qt.Key_Escape:
            self.stop_requested.emit()
        else:
            super().keyPressEvent(event)


class IdleWatcher(QObject):
    """Restarts a timer on any key or pointer event (kiosk idle timeout)."""

    def __init__(self, timer: QTimer) -> None:
        super().__init__()
        self.timer = timer

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        if event.type() in (QEvent.KeyPress, QEvent.MouseButtonPress, QEvent.TouchBegin, QEvent.Wheel):
            self.timer.start()
        return False


class MainWindow(QMainWindow):
    send_requested = Signal(str, object)
    load_requested = Signal()
    open_requested = Signal(object)
    configure_requested = Signal(object)  # AppContext: a snapshot for the worker (see _snapshot)
    shutdown_requested = Signal()
    delta_shown = Signal(str)  # emitted in the GUI thread once a delta is on screen
    answer_finished = Signal(object)  # TurnResult, in the GUI thread, after the view is final
    model_ready = Signal()  # in the GUI thread, once the status bar shows the loaded model
    model_failed = Signal(str)  # in the GUI thread: loading the model failed, with the one line saying why
    answer_measured = Signal(object)  # AnswerNumbers, in the GUI thread, once ``run_numbers`` holds them

    def __init__(self, app: AppContext, model_loader, kiosk: bool = False, model: str | None = None) -> None:
        """``model``: the model_bundle value this run starts with instead of the saved one (the command line's
        ``--bundle``/``--demo``), until a model is chosen in the window; the saved setting is left as it is."""
        super().__init__()
        self.app, self.kiosk, self.model_override = app, kiosk, model
        self.model_label, self.model_summary = "", {}
        self.answer_view: MessageView | None = None
        self.answering = False
        self.loading_model = False  # between the worker's ``loading`` and its ``loaded`` or ``failed``
        self.edit_target: int | None = None
        self.current_conversation: int | None = None
        self.run_numbers = RunNumbers()  # this run's answers, for the Live numbers panel (ui.live_numbers)
        self.setWindowTitle("StreamChat")
        self.setWindowIcon(app_icon())
        apply_theme(app.settings.theme)  # before the widgets: they take the application font's families
        self._build()
        self.thread = QThread(self)
        self.cancel = threading.Event()  # shared with the worker: set here, read there between tokens
        self.worker = ChatWorker(self._snapshot(), model_loader, self.cancel)
        self.worker.moveToThread(self.thread)
        self.send_requested.connect(self.worker.send)
        self.load_requested.connect(self.worker.load)
        self.open_requested.connect(self.worker.open_conversation)
        self.configure_requested.connect(self.worker.configure)
        self.shutdown_requested.connect(self.worker.shut_down)
        # Only bound methods of this window: Qt queues those into the GUI thread (a lambda would run in the worker).
        self.worker.loading.connect(self._on_loading)
        self.worker.loaded.connect(self._on_loaded)
        self.worker.started.connect(self._on_started)
        self.worker.delta.connect(self._on_delta)
        self.worker.measured.connect(self._on_measured)
        self.worker.finished.connect(self._on_finished)
        self.worker.failed.connect(self._on_failed)
        self.worker.not_saved.connect(self._on_not_saved)
        self.thread.start()
        self.load_requested.emit()
        if kiosk:
            self._enter_kiosk()
        self.refresh_sidebar()

    # -- layout ----------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.search = QLineEdit(placeholderText=t("Search conversations"))
        self.search.textChanged.connect(self.refresh_sidebar)
        self.conversations = QListWidget()
        self.conversations.itemClicked.connect(self._open_item)
        self.conversations.setContextMenuPolicy(Qt.CustomContextMenu)
        self.conversations.customContextMenuRequested.connect(self._conversation_menu)
        self.new_button = QPushButton(t("New conversation"))
        self.new_button.clicked.connect(self.new_conversation)
        self.sidebar = QWidget()
        side = QVBoxLayout(self.sidebar)
        for widget in (self.new_button, self.search, self.conversations):
            side.addWidget(widget)

        self.banner = QLabel()
        self.banner.setWordWrap(True)
        self.banner.setObjectName("banner")
        self.banner.hide()
        self.transcript = Transcript()
        self.editing = QLabel(t("Editing a sent message: sending replaces it and everything after it."))
        self.cancel_edit_button = QPushButton(t("Cancel editing"))
        self.cancel_edit_button.clicked.connect(self.cancel_edit)
        self.edit_bar = QWidget()
        edit_row = QHBoxLayout(self.edit_bar)
        edit_row.setContentsMargins(0, 0, 0, 0)
        edit_row.addWidget(self.editing, 1)
        edit_row.addWidget(self.cancel_edit_button)
        self.edit_bar.hide()
        self.composer = Composer(placeholderText=t("Type a message. Enter sends, Shift+Enter starts a new line, Esc stops."))
        self.composer.setObjectName("composer")
        self.composer.setFixedHeight(90)
        self.composer.submitted.connect(self.send_current)
        self.composer.stop_requested.connect(self.stop)
        self.send_button, self.stop_button = QPushButton(t("Send")), QPushButton(t("Stop"))
        self.send_button.setObjectName("primary")  # the accent colour (ui/theme.py)
        self.regenerate_button, self.settings_button = QPushButton(t("Regenerate")), QPushButton(t("Settings"))
        self.send_button.clicked.connect(self.send_current)
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button.clicked.connect(self.regenerate)
        self.settings_button.clicked.connect(self.open_settings)
        self.stop_button.setEnabled(False)
        buttons = QHBoxLayout()
        for button in (self.settings_button, self.regenerate_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.send_button)
        chat = QWidget()
        column = QVBoxLayout(chat)
        column.addWidget(self.banner)
        column.addWidget(self.transcript, 1)
        column.addWidget(self.edit_bar)
        column.addWidget(self.composer)
        column.addLayout(buttons)
        splitter = QSplitter()
        splitter.addWidget(self.sidebar)
        splitter.addWidget(chat)
        splitter.setSizes([240, 760])
        self.setCentralWidget(splitter)
        self.status = QLabel(t("Loading the model..."))
        self.speed = QLabel()
        self.load_progress = ProgressLine()
        self.model_button = QPushButton(t("Models..."))
        self.model_button.setFlat(True)
        self.model_button.clicked.connect(lambda: self.choose_model())
        self.statusBar().addWidget(self.status, 1)
        self.statusBar().addWidget(self.load_progress)
        self.statusBar().addPermanentWidget(self.speed)
        self.statusBar().addPermanentWidget(self.model_button)
        self.menu_actions = build_menus(self)
        self.resize(1100, 760)
        self.apply_font()

    def apply_font(self) -> None:
        """The font size setting (times the kiosk's scale in kiosk mode)."""
        scale = self.app.settings.kiosk.font_scale if self.kiosk else 1
        self._apply_font(self.app.settings.font_size * scale)

    def _apply_font(self, size: float) -> None:
        font = QApplication.font()
        font.setPointSizeF(size)
        QApplication.setFont(font)  # the application's: a style sheet (ui/theme.py) stops a window's reaching new widgets

    # -- model -----------------------------------------------------------------------------------------------
    def _on_loading(self, text: str) -> None:
        self.loading_model = True
        self.status.setText(t("Loading the model..."))
        self.load_progress.busy(t(text))  # a load reports stages, not fractions

    def _on_loaded(self, label: str, summary: dict) -> None:
        self.loading_model = False
        self.load_progress.done()
        self.model_label, self.model_summary = label, summary
        self.status.setText(f"{label}")
        self.speed.clear()  # the last answer's speed was another model's
        self._show_banner()
        self.model_ready.emit()

    def _show_banner(self) -> None:
        """The kiosk's welcome text; outside kiosk mode, a note while the demo model is loaded."""
        if self.kiosk:
            text = self.app.settings.kiosk.welcome_text
        elif self.model_summary.get("demo"):
            text = t("This is the built-in demo model: it only knows about StreamChat. To chat with ChatGLM-6B, "
                     "export a bundle (streamchat export CHECKPOINT --out BUNDLE) and open it in Settings.")
        else:
            text = ""
        self.banner.setText(text)
        self.banner.setVisible(bool(text))

    def choose_model(self, install: bool = False) -> None:
        """The model picker (``install``: straight to choosing a package to install); the chosen model loads."""
        if self.kiosk:
            return
        from ui.model_picker import ModelPicker

        picker = ModelPicker(self.app, self.model_summary.get("path", ""), self)
        picker.setAttribute(Qt.WA_DeleteOnClose)
        picker.chosen.connect(self.use_model)
        picker.open()
        if install:
            picker.ask_install()

    def use_model(self, bundle: str) -> None:
        """Load ``bundle`` (a model_bundle value: "" is the demo) and keep it as the saved choice."""
        if bundle != self.app.settings.model_bundle and not self.save_settings({"model_bundle": bundle}):
            return
        self.model_override = None
        self.configure_requested.emit(self._snapshot())  # the worker reopens the model if it is another

    def save_settings(self, values: dict) -> bool:
        """Save changed settings (keys as in the schema) and make them the window's; a dialog when they cannot be."""
        try:
            self.app.apply_settings(with_values(self.app.settings, values))
        except StreamChatError as exc:
            alert(self, t("Settings"), t(str(exc)))
            return False
        return True

    def reload_model(self) -> None:
        self.load_requested.emit()

    def _snapshot(self) -> AppContext:
        """The app context as the worker gets it, with its own copy of the settings: the settings, rules and history are
        replaced, never changed in place, when the dialog applies a change, and the copy keeps it that way for good.
        The command line's model, while it holds, stands in for the saved one."""
        settings = copy.deepcopy(self.app.settings)
        if self.model_override is not None:
            settings.model_bundle = self.model_override
        return dataclasses.replace(self.app, settings=settings)

    # -- conversations ---------------------------------------------------------------------------------------
    def refresh_sidebar(self) -> None:
        query = self.search.text().strip()
        self.conversations.clear()
        if query:
            seen = set()
            for message in self.app.history.search(query):
                if message.conversation_id not in seen:
                    seen.add(message.conversation_id)
                    conv = self.app.history.conversation(message.conversation_id)
                    self._add_item(conv.id, conv.title, message.text)
        else:
            for conv in self.app.history.conversations():
                self._add_item(conv.id, conv.title, "")

    def _add_item(self, conversation_id: int, title: str, hit: str) -> None:
        title = one_line(title)  # a title stored from a multi-line first message, or imported, is shown on one line
        item = QListWidgetItem(title if not hit else f"{title}\n  … {one_line(hit)[:40]}")
        item.setData(Qt.UserRole, conversation_id)
        self.conversations.addItem(item)

    def focus_search(self) -> None:
        self.search.setFocus()
        self.search.selectAll()

    def export_current(self) -> None:
        if self.current_conversation is None:
            self.statusBar().showMessage(t("There is no saved conversation on screen to export."), 4000)
            return
        self._export(self.current_conversation)

    def _open_item(self, item: QListWidgetItem) -> None:
        self.open_conversation(item.data(Qt.UserRole))

    def open_conversation(self, conversation_id: int | None) -> None:
        if self.answering:
            self.statusBar().showMessage(t("an answer is still being written: stop it or wait"), 4000)
            return
        self.cancel_edit()  # the message being edited belongs to the conversation on screen
        self.current_conversation = conversation_id
        self.open_requested.emit(conversation_id)
        self.transcript.clear()
        if conversation_id is not None:
            for message in self.app.history.messages(conversation_id):
                self._add_message(message.role, message.text, message.id)

    def new_conversation(self) -> None:
        self.open_conversation(None)
        self.composer.setFocus()

    def _add_message(self, role: str, text: str, message_id: int | None) -> MessageView:
        view = MessageView(role, text, message_id, editable=not self.kiosk,
                           allowed=lambda shown: self.app.rules.verdict(shown).allowed)
        view.edit_requested.connect(self._edit_message)
        return self.transcript.add(view)

    def _conversation_menu(self, pos) -> None:
        item = self.conversations.itemAt(pos)
        if item is None or self.kiosk:
            return
        conversation_id = item.data(Qt.UserRole)
        menu = QMenu(self)
        menu.addAction(t("Rename"), lambda: self._rename(conversation_id))
        menu.addAction(t("Delete"), lambda: self._delete(conversation_id))
        menu.addAction(t("Export..."), lambda: self._export(conversation_id))
        menu.exec(self.conversations.mapToGlobal(pos))

    def _rename(self, conversation_id: int) -> None:
        title, ok = QInputDialog.getText(self, t("Rename conversation"), t("Rename"),
                                         text=self.app.history.conversation(conversation_id).title)
        if ok and title.strip():
            self.app.history.rename(conversation_id, title.strip())
            self.refresh_sidebar()

    def _delete(self, conversation_id: int) -> None:
        """Delete for good (the freed pages are overwritten, see History.delete), so only after the user confirms."""
        title = one_line(self.app.history.conversation(conversation_id).title)
        answer = QMessageBox.question(self, t("Delete"), t("Delete the conversation \"{0}\"? This cannot be undone.")
                                      .format(title[:60]), QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        if answer != QMessageBox.Yes:
            return
        self.app.history.delete(conversation_id)
        if self.current_conversation == conversation_id:
            self.new_conversation()
        self.refresh_sidebar()

    def _export(self, conversation_id: int) -> None:
        from PySide6.QtWidgets import QFileDialog

        path, _ = QFileDialog.getSaveFileName(self, t("Export..."), "conversation.md", "Markdown (*.md);;JSON (*.json)")
        if path:
            import json
            from pathlib import Path

            history = self.app.history
            try:
                text = (json.dumps(history.export_json(conversation_id), ensure_ascii=False, indent=1)
                        if path.endswith(".json") else history.export_markdown(conversation_id))
                write_export(Path(path), text)
            except StreamChatError as exc:
                QMessageBox.warning(self, t("Export..."), t(str(exc)))

    # -- answering -------------------------------------------------------------------------------------------
    def send_current(self) -> None:
        text = self.composer.toPlainText().strip()
        if not text:
            return
        if self.answering:
            self.statusBar().showMessage(t("an answer is still being written: stop it or wait"), 4000)
            return
        target, self.edit_target = self.edit_target, None
        self.edit_bar.hide()
        self.composer.clear()
        self.send(text, target)

    def send(self, text: str, replace_from: int | None = None) -> None:
        if replace_from is not None:
            self.open_conversation(self.current_conversation)
            self.transcript.remove_from(replace_from)
        self.answering = True
        self._add_message("user", text, None)
        self.cancel.clear()
        self.send_requested.emit(text, replace_from)

    def stop(self) -> None:
        """The answer being written ends before its next token (a Stop before the worker starts it counts too)."""
        self.cancel.set()

    def regenerate(self) -> None:
        """Answer the last question again (the old answer is forgotten)."""
        if self.answering:
            return
        users = [v for v in self.transcript.views if v.role == "user" and v.message_id is not None]
        if users:
            last = users[-1]
            self.send(last.text, last.message_id)

    def _edit_message(self, message_id: int, text: str) -> None:
        """Put a sent message back in the composer, with a bar saying so; sending it replaces that message and
        everything after, Cancel editing leaves the conversation as it is. A message that was never stored (a question
        the safety filter refused: the history holds nothing of that turn) comes back to be rephrased and sent as a
        new message, with nothing to replace."""
        self.cancel_edit()
        if message_id >= 0:
            self.edit_target = message_id
            self.edit_bar.show()
        self.composer.setPlainText(text)
        self.composer.setFocus()

    def cancel_edit(self) -> None:
        if self.edit_target is not None:
            self.edit_target = None
            self.edit_bar.hide()
            self.composer.clear()

    def _on_started(self) -> None:
        if not self.loading_model:  # an earlier answer's error gives way: the model named is the one answering
            self.status.setText(self.model_label)
        self.answer_view = self._add_message("assistant", "", None)
        self.stop_button.setEnabled(True)
        self.send_button.setEnabled(False)
        self.regenerate_button.setEnabled(False)

    def _on_delta(self, text: str) -> None:
        if self.answer_view is not None:
            self.answer_view.append(text)  # the transcript follows it while the user is at the bottom
        self.delta_shown.emit(text)

    def _on_measured(self, numbers: AnswerNumbers) -> None:
        self.run_numbers.add(numbers)
        self.answer_measured.emit(numbers)

    def _on_finished(self, result: TurnResult, first_token_s: float) -> None:
        self.answering = False
        if self.kiosk:
            self.idle.start()  # the visitor reads the answer from now
        self.stop_button.setEnabled(False)
        self.send_button.setEnabled(True)
        self.regenerate_button.setEnabled(True)
        note = t("The answer was stopped.") if result.stopped == "cancelled" else ""
        if result.blocked_reason:
            note = t("Not sent: {0}").format(t(result.blocked_reason))
        if self.answer_view is not None:
            self.answer_view.finish(note)
        elif note:
            self._add_message("assistant", "", None).finish(note)
        self._refresh_ids(result)
        self._show_speed(result, first_token_s)
        self.answer_view = None
        if result.conversation_id is not None:  # a refused send leaves the conversation on screen as it was
            self.current_conversation = result.conversation_id
        self.refresh_sidebar()
        self.answer_finished.emit(result)

    def _show_speed(self, result: TurnResult, first_token_s: float) -> None:
        """Tokens/s of this answer, and the time to its first shown text when it showed any (an answer the filter
        held back entirely, or one stopped before its first text, has none); cleared when no token was generated."""
        gen = result.generation
        if not (gen and gen.token_ids):
            self.speed.clear()
            return
        rate = tokens_per_second(gen) or 0.0
        self.speed.setText(t("first token {0:.2f} s · {1:.1f} tokens/s").format(first_token_s, rate) if first_token_s
                           else t("{0:.1f} tokens/s").format(rate))

    def _refresh_ids(self, result: TurnResult) -> None:
        """Give the views of this turn their stored ids (for edit and regenerate)."""
        views = self.transcript.views
        if result.user_message_id is not None:
            user_views = [v for v in views if v.role == "user"]
            if user_views:
                user_views[-1].message_id = result.user_message_id
        if result.answer_message_id is not None and views and views[-1].role == "assistant":
            views[-1].message_id = result.answer_message_id

    def _on_failed(self, message: str, must_act: bool = False, engine_chosen: bool = False) -> None:
        """A failed load says what the user can do about it: the engine or device chosen in Settings when the failure
        is theirs (``engine_chosen``, see ui.worker), else the bundle (kiosk: the app retries by itself); a failed
        answer keeps the conversation, and the model stays loaded. What the user must act on (a model that did not
        load, messages the history could not store) is also a dialog, except in kiosk mode, which nobody attends. The
        core's line is shown in the window's language (ui.i18n)."""
        advice, title, load_failed, message = "", t("StreamChat"), self.loading_model, t(message)
        if load_failed:
            self.loading_model = False
            self.load_progress.done()
            title = t("The model could not be loaded")
            if not self.kiosk:
                advice = self._engine_advice() if engine_chosen else \
                    t("Choose another bundle in Settings, or leave its field empty for the built-in demo model.")
        self.status.setText(f"{t('Error: {0}').format(message)} {advice}".strip())
        if must_act and not self.kiosk:
            alert(self, title, f"{message}\n\n{advice}".strip())
        if load_failed:  # after the dialog: --ready-exit prints the line and quits on this signal
            self.model_failed.emit(message)
        if self.kiosk:
            QTimer.singleShot(3000, self, self.reload_model)  # unattended: bring the engine back by itself (the window
            # as context: the timer ends with it)

    def _engine_advice(self) -> str:
        """What to change when the engine or device chosen in Settings cannot load the bundle: names both, as the
        Settings dialog does."""
        from ui.settings_dialog import engine_label

        settings = self.app.settings
        engine = engine_label(settings.engine)
        device = t("CPU") if settings.device == "cpu" else f"{t('Ascend NPU')} {settings.device_id}"
        return t("This comes from the engine or device chosen in Settings (engine: {0}; device: {1}): choose others "
                 "there (onnxruntime on the CPU runs every bundle), or choose another bundle.").format(engine, device)

    # -- settings --------------------------------------------------------------------------------------------
    def open_settings(self) -> None:
        """The dialog changes ``self.app`` (saved settings, safety lists reloaded even on Cancel, a moved data folder);
        the worker then gets a snapshot of it, and the next answer runs on it."""
        if self.kiosk:
            return
        from ui.settings_dialog import SettingsDialog

        history, bundle = self.app.history, self.app.settings.model_bundle
        if SettingsDialog(self.app, self.model_summary, self).exec():
            apply_theme(self.app.settings.theme)
            self.apply_font()
            if self.app.settings.model_bundle != bundle:  # a bundle chosen in Settings replaces the command line's
                self.model_override = None
        self.configure_requested.emit(self._snapshot())
        if self.app.history is not history:  # the data folder moved: show the conversations stored there
            self.new_conversation()
            self.refresh_sidebar()

    # -- kiosk -----------------------------------------------------------------------------------------------
    def _enter_kiosk(self) -> None:
        self.sidebar.hide()
        self.settings_button.hide()
        self.model_button.hide()
        self.menuBar().hide()
        for name, action in self.menu_actions.items():
            action.setEnabled(name == KIOSK_ACTION)  # the operator's, behind the PIN
        self.setWindowFlag(Qt.FramelessWindowHint, True)
        self.idle = QTimer(self)
        self.idle.setSingleShot(True)
        self.idle.timeout.connect(self._idle_reset)
        self.apply_kiosk_settings()
        self.watcher = IdleWatcher(self.idle)
        QApplication.instance().installEventFilter(self.watcher)
        self.idle.start()
        QShortcut(QKeySequence("Ctrl+Shift+Q"), self, self._operator_exit)
        self.showFullScreen()

    def _idle_reset(self) -> None:
        """Unattended: show a fresh conversation (the old one kept or deleted per setting). A visitor watching an
        answer being written is not idle: the timer counts again from the answer's end (``_on_finished``)."""
        if self.answering:
            return
        previous = self.current_conversation
        if previous is not None and not self.app.settings.kiosk.keep_history:
            self.app.history.delete(previous)
        self.new_conversation()
        self.speed.clear()  # the next visitor does not see the last one's timings

    def apply_kiosk_settings(self) -> None:
        """The kiosk settings as saved now: font scale, idle timeout (counted again from now), welcome text."""
        self.apply_font()
        self._show_banner()
        if self.kiosk:
            self.idle.setInterval(self.app.settings.kiosk.idle_timeout_s * 1000)

    def open_kiosk_settings(self) -> None:
        """The kiosk's settings, for the operator: behind the PIN (ui.kiosk_settings)."""
        from ui.kiosk_settings import KioskSettingsDialog, with_operator_pin

        with_operator_pin(self, lambda: KioskSettingsDialog(self).open())

    def _operator_exit(self) -> None:
        from ui.kiosk_settings import with_operator_pin

        with_operator_pin(self, self._exit_as_operator)

    def _exit_as_operator(self) -> None:
        QApplication.instance().setProperty("operator_exit", True)
        self.close()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        if self.kiosk and QApplication.instance().property("operator_exit") is not True:
            event.ignore()  # no way out of kiosk mode but the operator PIN
            return
        self.stop()
        self.shutdown_requested.emit()  # the worker stores what a full disk refused, then ends its thread
        self.thread.wait(5000)
        QCoreApplication.sendPostedEvents(self, QEvent.MetaCall)  # its last signals (not_saved), before the window goes
        super().closeEvent(event)

    def _on_not_saved(self, message: str) -> None:
        QMessageBox.critical(self, "StreamChat", t(message))
