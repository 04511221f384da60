"""The window's error path: a bug in a GUI slot or in the worker becomes one line (dialog / status), the traceback a
crash log, and the window keeps running."""

import os
import sys
import threading

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication, QMessageBox  # noqa: E402

from appliance.app import AppContext  # noqa: E402
from ui.app import install_crash_dialog  # noqa: E402
from ui.main_window import MainWindow  # noqa: E402


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    for name in ("CONFIG", "DATA", "CACHE"):
        monkeypatch.setenv(f"STREAMCHAT_{name}_DIR", str(tmp_path / name.lower()))
    return tmp_path


@pytest.mark.qt_no_exception_capture
def test_bug_in_a_gui_slot_shows_a_dialog_and_writes_a_crash_log(qtbot, dirs, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    install_crash_dialog()

    def broken_slot() -> None:
        raise ValueError("slot exploded")

    QTimer.singleShot(0, broken_slot)
    boxes: list[QMessageBox] = []  # this bug's dialog (one an earlier test left open is not it)
    qtbot.waitUntil(lambda: bool(boxes.extend(w for w in QApplication.topLevelWidgets()
                                              if isinstance(w, QMessageBox) and w.isVisible()
                                              and "slot exploded" in w.text()) or boxes), timeout=5000)
    logs = list((dirs / "cache" / "crashes").glob("crash-*.txt"))
    assert len(logs) == 1 and "slot exploded" in logs[0].read_text(encoding="utf-8")
    assert boxes[0].text() == (f"unexpected error while running the window (ValueError: slot exploded); "
                               f"the details are in {logs[0]}")
    boxes[0].close()


def test_bug_while_loading_reaches_the_window_as_one_line(qtbot, dirs):
    listening = threading.Event()  # the load fails only once the test listens for the signal

    def loader(settings, progress):
        listening.wait(10)
        raise RuntimeError("engine exploded")

    window = MainWindow(AppContext.load(), loader)
    qtbot.addWidget(window)
    with qtbot.waitSignal(window.worker.failed, timeout=10000) as failed:
        listening.set()
    logs = list((dirs / "cache" / "crashes").glob("crash-*.txt"))
    assert len(logs) == 1
    assert failed.args[0] == (f"unexpected error while loading the model (RuntimeError: engine exploded); "
                              f"the details are in {logs[0]}")
    qtbot.waitUntil(lambda: "engine exploded" in window.status.text(), timeout=5000)
    window.thread.quit()
    window.thread.wait(5000)


def test_export_into_a_missing_folder_is_a_dialog_and_writes_nothing(qtbot, dirs, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    app = AppContext.load()
    conversation = app.history.new_conversation("kept")
    app.history.add_message(conversation, "user", "a question")
    window = MainWindow(app, lambda settings, progress: (_ for _ in ()).throw(RuntimeError("no model needed")))
    qtbot.addWidget(window)
    target = dirs / "missing" / "out.md"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), "Markdown (*.md)"))
    warnings = []
    monkeypatch.setattr(QMessageBox, "warning", lambda parent, title, text: warnings.append(text))
    window._export(conversation)
    assert warnings == [f"cannot write {target}: the folder {target.parent} does not exist"]
    assert not (dirs / "missing").exists()
    window.thread.quit()
    window.thread.wait(5000)
