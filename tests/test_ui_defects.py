"""Defects a new user met in the window (issue 20), each as the user meets it: Regenerate and Edit leaving the replaced
messages as windows of their own, a send after a failed load, Verify in Settings, and the smaller ones (titles,
delete, edit, tokens/s, the Chinese UI, advice after a failed load)."""

import ast
import os
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication, QEvent, QObject, QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication, QDialogButtonBox, QMessageBox, QPushButton  # noqa: E402

from appliance.app import AppContext  # noqa: E402
from appliance.generation import GenerationResult  # noqa: E402
from appliance.loading import demo_bundle  # noqa: E402
from appliance.session import TurnResult  # noqa: E402
from appliance.settings import SCHEMA  # noqa: E402
from model_export.export import export_bundle  # noqa: E402
from tests.ui_helpers import PacedEngine, stop_worker  # noqa: E402
from tests.ui_helpers import ask as _ask  # noqa: E402
from tests.ui_helpers import open_window as _window  # noqa: E402
from ui.app import model_loader  # noqa: E402
from ui.i18n import ZH_CN, translators_for  # noqa: E402
from ui.messages import MessageView, t  # noqa: E402
from ui.settings_dialog import SettingsDialog  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _app(tweak=lambda settings: None) -> AppContext:
    app = AppContext.load()
    app.settings.generation.top_k, app.settings.generation.max_new_tokens = 1, 12
    tweak(app.settings)
    return app


def _settle():
    """Run what the event loop has queued: the shows layouts schedule for new widgets, and the deferred deletes."""
    for _ in range(3):
        QApplication.processEvents()
        QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)


def _close(window):
    """Stop the worker, and run what the window queued (deferred deletes) while the test still holds it."""
    stop_worker(window)
    _settle()


class WindowsShown(QObject):
    """Counts the messages shown as windows of their own: such a window appears (and takes the focus under a window
    manager) as soon as it is shown, even when it is deleted soon after."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: list[str] = []

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt override
        if event.type() == QEvent.Show and isinstance(obj, MessageView) and obj.isWindow():
            self.shown.append(obj.role)
        return False


def test_regenerate_and_edit_leave_no_message_as_a_window_of_its_own(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False))
    first = _ask(qtbot, window, "你好")
    _settle()
    top_level = len(QApplication.topLevelWidgets())
    windows = WindowsShown()
    QApplication.instance().installEventFilter(windows)

    with qtbot.waitSignal(window.answer_finished, timeout=60000):
        window.regenerate()
    _settle()
    assert len(QApplication.topLevelWidgets()) == top_level and windows.shown == []
    user = next(v for v in window.transcript.views if v.role == "user")
    window._edit_message(user.message_id, user.text)
    _ask(qtbot, window, "晚上好")
    _settle()
    QApplication.instance().removeEventFilter(windows)

    assert len(QApplication.topLevelWidgets()) == top_level and windows.shown == []
    assert not [w for w in QApplication.topLevelWidgets() if isinstance(w, MessageView)]
    assert [(v.role, v.text) for v in window.transcript.views][0] == ("user", "晚上好")
    assert len(window.transcript.views) == 2
    assert [m.text for m in window.app.history.messages(first.conversation_id)][0] == "晚上好"
    window.close()
    _settle()
    assert not [w for w in QApplication.topLevelWidgets() if w.isVisible()]  # nothing left to keep the app running


def test_a_send_after_a_failed_load_does_not_jam_the_window(qtbot, tiny, app_dirs):
    """The model fails to load (a bundle that is not there); sends are answered "not sent", the window stays usable,
    and choosing a good bundle in Settings gives answers."""
    app = _app(lambda s: setattr(s, "model_bundle", str(app_dirs / "gone")))
    stored = app.history.new_conversation("stored")
    app.history.add_message(stored, "user", "an earlier question")
    window = _window(qtbot, app, model_loader(None, demo=False), loaded=False)
    qtbot.waitUntil(lambda: "bundle not found" in window.status.text(), timeout=10000)
    assert t("Choose another bundle in Settings, or leave its field empty for the built-in demo model.") in \
        window.status.text()

    window.open_conversation(stored)
    for _ in range(2):  # the second send is not refused as "an answer is still being written"
        refused = _ask(qtbot, window, "你好")
        assert (refused.stopped, refused.blocked_reason) == ("error", "the model is not loaded")
        assert not window.answering and window.send_button.isEnabled() and not window.stop_button.isEnabled()
    assert window.statusBar().currentMessage() == ""
    assert window.current_conversation == stored  # the refused sends did not leave the conversation on screen
    window.new_conversation()
    assert window.current_conversation is None and window.transcript.views == []
    window.open_conversation(stored)
    assert [v.text for v in window.transcript.views] == ["an earlier question"]

    def choose_tiny():
        dialog = next(w for w in QApplication.topLevelWidgets() if isinstance(w, SettingsDialog) and w.isVisible())
        dialog.bundle.setText(str(tiny))
        dialog.accept()

    QTimer.singleShot(0, choose_tiny)
    with qtbot.waitSignal(window.model_ready, timeout=60000):
        window.open_settings()
    answered = _ask(qtbot, window, "你好")
    assert answered.stopped in ("eos", "max_new_tokens") and answered.response
    _close(window)


def test_kiosk_idle_reset_after_a_send_without_a_model(qtbot, app_dirs):
    def tweak(s):
        s.kiosk.idle_timeout_s = 1

    def broken(settings, progress):
        raise OSError("the bundle's disk is gone")

    window = _window(qtbot, _app(tweak), broken, kiosk=True, loaded=False)
    qtbot.waitUntil(lambda: "disk is gone" in window.status.text(), timeout=10000)
    assert "Settings" not in window.status.text()  # no advice a kiosk visitor cannot follow
    _ask(qtbot, window, "你好")
    assert window.transcript.views
    qtbot.waitUntil(lambda: not window.transcript.views, timeout=5000)  # the idle reset ran
    assert not window.answering
    _close(window)


def test_verify_checks_the_bundle_in_the_field_and_shows_its_own_manifest(qtbot, tiny, app_dirs):
    demo = demo_bundle(app_dirs / "data", export_bundle)
    dialog = SettingsDialog(_app(), {"demo": True, "path": str(demo)})
    qtbot.addWidget(dialog)
    verify = next(b for b in dialog.findChildren(QPushButton) if b.text() == t("Verify"))
    assert "StreamChat demo model" in dialog.manifest.toPlainText()

    dialog.bundle.setText(str(tiny))  # typed, not browsed: the manifest shown is still the demo's
    verify.click()
    shown = dialog.manifest.toPlainText()
    assert shown.startswith(f"OK: {tiny}\n") and "StreamChat demo model" not in shown and '"target": "cpu"' in shown

    dialog.bundle.setText("")  # empty: the demo, not the current directory
    verify.click()
    assert dialog.manifest.toPlainText().startswith(f"OK: {demo}\n")
    assert "StreamChat demo model" in dialog.manifest.toPlainText()

    not_demo = SettingsDialog(_app(), {"demo": False, "path": str(tiny)})
    qtbot.addWidget(not_demo)
    next(b for b in not_demo.findChildren(QPushButton) if b.text() == t("Verify")).click()
    assert not_demo.manifest.toPlainText().startswith(t("The field is empty: the built-in demo model is used."))


def test_a_multi_line_first_message_gives_a_one_line_title(qtbot, app_dirs):
    app = _app()
    cid = app.history.new_conversation()
    app.history.add_message(cid, "user", "first line\nsecond line\n\nthird\nfourth")
    assert app.history.conversation(cid).title == "first line second line third fourth"
    older = app.history.new_conversation()
    app.history.rename(older, "stored by an older version\nwith a second line")
    window = _window(qtbot, app, lambda settings, progress: (_ for _ in ()).throw(OSError("no model")), loaded=False)
    titles = [window.conversations.item(i).text() for i in range(window.conversations.count())]
    assert titles == ["stored by an older version with a second line", "first line second line third fourth"]
    _close(window)


def test_delete_asks_first(qtbot, app_dirs, monkeypatch):
    app = _app()
    cid = app.history.new_conversation("keep me")
    window = _window(qtbot, app, lambda settings, progress: (_ for _ in ()).throw(OSError("no model")), loaded=False)
    asked = []

    def answer(reply):
        def question(parent, title, text, buttons, default):
            asked.append((text, default))
            return reply
        return question

    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.No))
    window._delete(cid)
    assert [c.id for c in app.history.conversations()] == [cid] and window.conversations.count() == 1
    assert asked == [(t('Delete the conversation "{0}"? This cannot be undone.').format("keep me"), QMessageBox.No)]
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.Yes))
    window._delete(cid)
    assert app.history.conversations() == [] and window.conversations.count() == 0
    _close(window)


def test_edit_shows_that_it_is_editing_and_can_be_cancelled(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False))
    first = _ask(qtbot, window, "你好")
    user = window.transcript.views[0]
    window._edit_message(user.message_id, user.text)
    assert window.edit_bar.isVisible() and window.composer.toPlainText() == "你好"
    window.cancel_edit_button.click()
    assert not window.edit_bar.isVisible() and window.composer.toPlainText() == "" and window.edit_target is None
    _ask(qtbot, window, "晚上好")  # a new turn, not a replacement of the first
    assert [m.text for m in window.app.history.messages(first.conversation_id)][::2] == ["你好", "晚上好"]

    window._edit_message(user.message_id, user.text)
    window.new_conversation()  # the message being edited is not in the next conversation
    assert window.edit_target is None and not window.edit_bar.isVisible()
    _close(window)


def test_tokens_per_second_belongs_to_this_model_and_this_answer(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False))
    _ask(qtbot, window, "你好")
    assert window.speed.text()
    with qtbot.waitSignal(window.model_ready, timeout=60000):
        window.reload_model()
    assert window.speed.text() == ""  # not the previous model's

    unseen = TurnResult(generation=GenerationResult(prompt_ids=[1], token_ids=[5, 6], decode_ms_per_token=50.0))
    window._show_speed(unseen, 0.0)  # generated, but nothing was shown: no "first token 0.00 s"
    assert window.speed.text() == t("{0:.1f} tokens/s").format(20.0)
    window._show_speed(TurnResult(generation=GenerationResult(prompt_ids=[1])), 0.0)
    assert window.speed.text() == ""
    _close(window)


def test_kiosk_idle_reset_clears_the_last_visitors_speed(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(lambda s: setattr(s.kiosk, "idle_timeout_s", 1)), model_loader(tiny, demo=False),
                     kiosk=True)
    _ask(qtbot, window, "你好")
    assert window.speed.text()
    qtbot.waitUntil(lambda: not window.transcript.views, timeout=5000)
    assert window.speed.text() == ""
    QApplication.instance().setProperty("operator_exit", True)  # so that the kiosk window may close after the test
    _close(window)


def test_kiosk_idle_counts_from_the_end_of_an_answer(qtbot, tiny, app_dirs):
    """A visitor watching a slow answer is not idle: the answer is not cut off, and the reset comes after its end."""
    def slow_loader(settings, progress):
        loaded = model_loader(tiny, demo=False)(settings, progress)
        loaded.engine = PacedEngine(loaded.engine, lambda step: 0.2)  # 12 tokens: over 2 s, twice the timeout
        return loaded

    window = _window(qtbot, _app(lambda s: setattr(s.kiosk, "idle_timeout_s", 1)), slow_loader, kiosk=True)
    started = time.perf_counter()
    result = _ask(qtbot, window, "你好")
    ended = time.perf_counter()
    assert ended - started > 2 and result.stopped != "cancelled", (ended - started, result.stopped)
    assert window.transcript.views  # still there for the visitor to read
    qtbot.waitUntil(lambda: not window.transcript.views, timeout=5000)
    assert time.perf_counter() - ended >= 0.9  # a whole timeout after the answer's end
    QApplication.instance().setProperty("operator_exit", True)  # so that the kiosk window may close after the test
    _close(window)


def _translated_texts() -> set[str]:
    """Every text the window passes to ``t`` as a literal, and the labels of the settings dialog."""
    texts = set()
    for source in (REPO / "ui").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "t" and \
                    isinstance(node.args[0], ast.Constant):
                texts.add(node.args[0].value)
    for setting in SCHEMA:
        if setting.label:
            texts.update((setting.label, *(setting.choice_labels or ())))
    return texts


def test_the_chinese_ui_translates_every_text_and_says_tokens():
    texts = _translated_texts()
    assert len(texts) > 40
    assert sorted(texts - set(ZH_CN)) == []
    assert "词元/秒" in ZH_CN["first token {0:.2f} s · {1:.1f} tokens/s"] and "字/秒" not in "".join(ZH_CN.values())
    for reason in ("the model is not loaded", "the built-in demo model"):  # texts of the worker the window translates
        assert reason in ZH_CN


def test_qts_own_buttons_are_chinese_in_the_chinese_ui(qtbot):
    translators = translators_for("zh_CN")
    qt = QApplication.instance()
    for translator in translators:
        qt.installTranslator(translator)
    try:
        box = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Cancel | QDialogButtonBox.Ok)
        qtbot.addWidget(box)
        assert [box.button(b).text().replace("&", "") for b in (QDialogButtonBox.Save, QDialogButtonBox.Cancel,
                                                                QDialogButtonBox.Ok)] == ["保存", "取消", "确定"]
    finally:
        for translator in translators:
            qt.removeTranslator(translator)
    assert translators_for("en_US") == []
