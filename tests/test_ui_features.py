"""What users of other local chat apps expect from the window (issue 20, item 4), on real bundles, offscreen: the model
picker and a package install from it (progress, cancel), a progress bar while a model loads, modal dialogs for errors
a user must act on, engine and device in Settings, the system prompt, the menu bar and its shortcuts, the text size,
and the kiosk's settings behind the operator PIN."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QGuiApplication  # noqa: E402
from PySide6.QtWidgets import (  # noqa: E402
    QApplication,
    QDialogButtonBox,
    QInputDialog,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
)

import appliance  # noqa: E402
from appliance import bundle_package  # noqa: E402
from appliance.app import AppContext  # noqa: E402
from appliance.history import History, HistoryError  # noqa: E402
from appliance.kernels import prompt_kernels  # noqa: E402
from appliance.prompt import build_prompt  # noqa: E402
from appliance.settings import load_settings  # noqa: E402
from tests.ui_helpers import ask, open_window, stop_worker  # noqa: E402
from ui.app import model_loader  # noqa: E402
from ui.i18n import ZH_CN, translators_for  # noqa: E402
from ui.kiosk_settings import KioskSettingsDialog  # noqa: E402
from ui.main_window import MainWindow  # noqa: E402
from ui.menus import build_menus  # noqa: E402
from ui.model_picker import InstallJob, ModelPicker, human_size, installed_bundles  # noqa: E402
from ui.settings_dialog import SettingsDialog, devices_for, engines_for  # noqa: E402

SYSTEM = "你是 StreamChat 的助手，回答要简短。"


@pytest.fixture(scope="module")
def package(tiny, tmp_path_factory) -> Path:
    """The golden fixture's bundle packed as `streamchat bundle pack` packs it."""
    return bundle_package.pack(tiny, tmp_path_factory.mktemp("package") / "tiny.tar")


def _app(tweak=lambda settings: None) -> AppContext:
    app = AppContext.load()
    app.settings.generation.top_k, app.settings.generation.max_new_tokens = 1, 8
    tweak(app.settings)
    return app


def _window(qtbot, app, loader=None, kiosk=False, loaded=True) -> MainWindow:
    return open_window(qtbot, app, loader or model_loader(None, demo=False), kiosk, loaded)


def _close(window: MainWindow) -> None:
    stop_worker(window)


def _dialogs(parent, kind=QMessageBox) -> list:
    return [w for w in parent.findChildren(kind) if w.isVisible()]


def _files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.resolve().rglob("*") if p.is_file())


# -- the model picker ------------------------------------------------------------------------------------------------
def test_the_picker_lists_the_bundles_on_disk(qtbot, tiny, package, app_dirs):
    models = app_dirs / "data" / "bundles"
    installed = bundle_package.install(package, models)  # as `streamchat bundle install` puts it there
    (models / "broken").mkdir()
    app = _app()
    picker = ModelPicker(app)
    qtbot.addWidget(picker)
    rows = [[picker.table.item(r, c).text() for c in range(picker.table.columnCount())]
            for r in range(picker.table.rowCount())]
    assert rows[0] == ["the built-in demo model", "", "—", "cpu", "prepared when first loaded"]
    assert rows[1][0] == "broken" and rows[1][4] == str(models / "broken")
    assert rows[2] == ["ChatGLM-6B", "FP32", human_size(_files_bytes(installed)), "cpu", str(installed)]
    assert len(rows) == 3 and _files_bytes(installed) == _files_bytes(tiny)
    assert [e.setting for e in picker.entries] == ["", str(models / "broken"), str(installed)]

    picker.choose(1)  # a bundle that does not open: a dialog says why, nothing is chosen
    [box] = _dialogs(picker)
    assert box.text() == f"{models / 'broken'} is not a StreamChat bundle (no manifest.json); export one with " \
                         "`streamchat export`"
    box.close()
    with qtbot.waitSignal(picker.chosen) as chosen:
        picker.choose(2)
    assert chosen.args == [str(installed)]
    # a configured bundle outside the models folders is listed too
    app.settings.model_bundle = str(tiny)
    assert [e.folder for e in installed_bundles(app.settings)][-1] == str(tiny)


def test_choosing_in_the_picker_loads_that_model_with_a_progress_bar(qtbot, package, app_dirs):
    """The demo is not prepared here, so the first load fails: a dialog with the advice. Choosing the installed
    bundle in the picker loads it (a busy bar with the stage while it loads) and saves the choice."""
    installed = bundle_package.install(package, app_dirs / "data" / "bundles")
    real, gate = model_loader(None, demo=False), threading.Event()

    def gated(settings, progress):  # the real load, held after its first stage until the test has seen the bar
        if settings.model_bundle:
            progress("opening the bundle")
            gate.wait(30)
        return real(settings, progress)

    window = _window(qtbot, _app(), gated, loaded=False)
    qtbot.waitUntil(lambda: bool(_dialogs(window)), timeout=30000)
    [box] = _dialogs(window)
    assert "the built-in demo model is not prepared" in box.text()
    assert box.text().endswith("Choose another bundle in Settings, or leave its field empty for the built-in demo model.")
    assert box.windowModality() == Qt.WindowModal and not window.load_progress.isVisible()
    box.close()

    window.choose_model()
    [picker] = _dialogs(window, ModelPicker)
    row = next(i for i, e in enumerate(picker.entries) if e.folder == str(installed))
    picker.choose(row)
    qtbot.waitUntil(lambda: window.load_progress.text.text() == "opening the bundle", timeout=10000)
    assert window.load_progress.isVisible() and window.load_progress.bar.maximum() == 0  # busy: stages, no fractions
    assert window.status.text() == "Loading the model..."
    with qtbot.waitSignal(window.model_ready, timeout=60000):
        gate.set()
    assert window.model_summary["path"] == str(installed) and window.model_summary["engine"] == "onnxruntime"
    assert not window.load_progress.isVisible() and load_settings().model_bundle == str(installed)
    assert window.status.text() == window.model_label == "ChatGLM-6B · FP32 · cpu"
    _close(window)


def test_a_package_installs_from_the_picker_with_progress(qtbot, tiny, package, app_dirs):
    picker = ModelPicker(_app())
    qtbot.addWidget(picker)
    with qtbot.waitSignal(picker.install_finished, timeout=60000) as finished:
        picker.install(package)
        job, values = picker.job, []
        picker.progress.findChild(QProgressBar).valueChanged.connect(values.append)
    installed = app_dirs / "data" / "bundles" / "tiny"
    assert finished.args == [str(installed)] and installed.is_symlink()
    listed = sum(f["bytes"] for f in json.loads((tiny / "manifest.json").read_text())["files"])
    assert job.written == sum(f.stat().st_size for f in tiny.iterdir()) + listed  # every byte extracted, then hashed
    assert values == sorted(values) and values[-1] == job.written
    assert picker.entries[picker.table.currentRow()].folder == str(installed)
    assert picker.note.text() == f"Installed and verified: {installed}"


def test_a_cancelled_install_changes_nothing(qtbot, package, app_dirs, monkeypatch):
    models = app_dirs / "data" / "bundles"
    before = bundle_package.install(package, models).resolve()
    pressed, real = threading.Event(), InstallJob._on_bytes
    monkeypatch.setattr(InstallJob, "_on_bytes", lambda job, count: (pressed.wait(10), real(job, count)))  # the first
    # chunk waits until Cancel has been pressed, as a large package's would
    picker = ModelPicker(_app())
    qtbot.addWidget(picker)
    with qtbot.waitSignal(picker.install_finished, timeout=60000) as finished:
        picker.install(package)
        qtbot.mouseClick(picker.progress.findChild(QPushButton), Qt.LeftButton)  # the dialog's Cancel button
        pressed.set()
    assert finished.args == [""] and picker.note.text() == "Install cancelled: nothing was changed."
    assert not _dialogs(picker)  # a cancel is not an error
    assert (models / "tiny").resolve() == before and sorted(p.name for p in models.iterdir()) == \
        sorted(["tiny", before.name])  # no staging folder left


def test_cancel_while_the_extracted_bundle_is_verified_still_cancels(tiny, package, app_dirs):
    """A large bundle takes seconds to verify after its last byte is extracted: Cancel pressed then is obeyed too, and
    nothing is installed."""
    models = app_dirs / "models"
    job = InstallJob(package, models)
    extracted = _files_bytes(tiny)
    job.progress.connect(lambda written: written >= extracted and job.cancel.set(),
                         Qt.DirectConnection)  # as Cancel pressed right after the extraction
    ended: list[tuple[str, str]] = []
    job.done.connect(lambda path: ended.append(("done", path)), Qt.DirectConnection)
    job.failed.connect(lambda line: ended.append(("failed", line)), Qt.DirectConnection)
    job.run()
    assert ended == [("failed", "the install was cancelled; nothing was changed")]
    assert not (models / "tiny").exists() and not [p for p in models.iterdir() if p.name.startswith(".tiny")]


def test_a_bad_package_is_a_dialog_with_advice(qtbot, app_dirs):
    bad = app_dirs / "not-a-bundle.tar"
    bad.write_bytes(b"this is no tar file" * 100)
    picker = ModelPicker(_app())
    qtbot.addWidget(picker)
    with qtbot.waitSignal(picker.install_finished, timeout=60000):
        picker.install(bad)
    [box] = _dialogs(picker)
    assert box.windowTitle() == "The package was not installed"
    assert box.text() == (f"{bad} is not an uncompressed tar made by `streamchat bundle pack` (compressed packages are "
                          "refused): re-pack the bundle")
    box.close()
    assert not (app_dirs / "data" / "bundles" / "not-a-bundle").exists()


def test_the_menus_install_action_runs_the_picker_install(qtbot, tiny, package, app_dirs, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    window = _window(qtbot, _app(), model_loader(tiny, demo=False))
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(package), ""))
    window.menu_actions["install_package"].trigger()
    [picker] = _dialogs(window, ModelPicker)
    qtbot.waitUntil(lambda: picker.job is None, timeout=60000)
    assert (app_dirs / "data" / "bundles" / "tiny").is_symlink()
    picker.reject()
    _close(window)


# -- errors a user must act on -----------------------------------------------------------------------------------------
def test_history_that_cannot_be_written_is_a_dialog_with_its_advice(qtbot, tiny, app_dirs, monkeypatch):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False))

    def full(self, *args, **kwargs):
        raise HistoryError("the disk is full: nothing was saved; free space and try again", "the disk is full",
                           "free space")

    monkeypatch.setattr(History, "add_message", full)
    ask(qtbot, window, "你好")
    qtbot.waitUntil(lambda: bool(_dialogs(window)), timeout=10000)
    [box] = _dialogs(window)
    assert box.text() == ("the disk is full: 2 messages are not saved yet (kept in memory); free space and they are "
                          "saved with the next message")
    box.close()
    monkeypatch.undo()
    _close(window)


def test_a_refused_send_goes_to_the_status_bar_not_a_dialog(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False))
    window.answering = True
    window.composer.setPlainText("再问一次")
    window.send_current()
    assert window.statusBar().currentMessage() == "an answer is still being written: stop it or wait"
    assert not _dialogs(window)
    window.answering = False
    _close(window)


# -- engine and device -------------------------------------------------------------------------------------------------
def test_settings_offer_the_engines_and_devices_the_bundles_target_runs(qtbot, tiny, app_dirs):
    assert engines_for("cpu") == ["auto", "onnxruntime"]
    assert engines_for("ascend-310b") == ["auto", "onnxruntime", "mindspore-lite", "acl", "mindspore"]
    assert devices_for("auto", "cpu") == ("cpu",) and devices_for("acl", "ascend-910b") == ("ascend",)
    assert devices_for("mindspore", "ascend-910b") == ("cpu", "ascend")
    dialog = SettingsDialog(_app(lambda s: setattr(s, "model_bundle", str(tiny))), {})
    qtbot.addWidget(dialog)
    engine = dialog.editors["engine"]
    assert [engine.itemData(i) for i in range(engine.count())] == ["auto", "onnxruntime"]
    assert not dialog.editors["device"].isEnabled() and not dialog.editors["device_id"].isEnabled()
    engine.setCurrentIndex(1)
    qtbot.mouseClick(dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.Save), Qt.LeftButton)
    assert (load_settings().engine, load_settings().device) == ("onnxruntime", "cpu")


@pytest.mark.parametrize("points", [11, 16])
def test_the_settings_dialogs_fit_the_screen_with_save_in_reach(qtbot, tiny, app_dirs, points):
    """The form scrolls when the screen is too low for it: Save and Cancel stay on the screen (a 768-line laptop, a
    kiosk's small panel, a big text size)."""
    qt = QApplication.instance()
    font = qt.font()
    bigger = qt.font()
    bigger.setPointSize(points)
    qt.setFont(bigger)
    try:
        window = _window(qtbot, _app(), model_loader(tiny, demo=False))
        for dialog in (SettingsDialog(window.app, window.model_summary, window), KioskSettingsDialog(window)):
            dialog.show()
            screen = dialog.screen().availableGeometry()
            assert dialog.minimumSizeHint().height() <= screen.height()
            assert dialog.frameGeometry().height() <= screen.height()
            save = dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.Save)
            assert save.isVisible() and screen.contains(save.mapToGlobal(save.rect().bottomRight()))
            dialog.reject()
        _close(window)
    finally:
        qt.setFont(font)


def test_engine_and_device_are_used_when_loading(qtbot, tiny, app_dirs):
    """A device the engine cannot run on fails the load with a dialog; the engine setting reaches the engine."""
    window = _window(qtbot, _app(lambda s: setattr(s, "model_bundle", str(tiny))))
    assert window.model_summary["engine"] == "onnxruntime" and window.model_summary["device"] == "cpu"
    window.save_settings({"device": "ascend", "device_id": 3})
    window.configure_requested.emit(window._snapshot())
    qtbot.waitUntil(lambda: bool(_dialogs(window)), timeout=30000)
    [box] = _dialogs(window)
    assert box.windowTitle() == "The model could not be loaded"
    assert box.text().startswith("engine onnxruntime runs on cpu, not on ascend")
    box.close()
    window.save_settings({"device": "cpu", "engine": "onnxruntime"})
    with qtbot.waitSignal(window.model_ready, timeout=60000):
        window.configure_requested.emit(window._snapshot())
    assert window.model_summary["engine"] == "onnxruntime"
    _close(window)


def test_the_window_answers_on_the_mindspore_engine_chosen_in_settings(qtbot, tmp_path_factory, app_dirs):
    """An Ascend bundle with the engine set to mindspore (on this machine's CPU) answers in the window, and its greedy
    answer is `streamchat generate --engine mindspore`'s."""
    pytest.importorskip("mindspore", reason="the mindspore engine needs pip install 'streamchat[mindspore]'")
    from model_export.export import export_bundle
    from tests.conftest import TINY

    bundle = export_bundle(TINY, tmp_path_factory.mktemp("ms") / "tiny", target="ascend-910b", quant="fp32").bundle
    window = _window(qtbot, _app(lambda s: (setattr(s, "model_bundle", str(bundle)), setattr(s, "engine", "mindspore"))))
    assert (window.model_summary["engine"], window.model_summary["device"]) == ("mindspore", "cpu")
    result = ask(qtbot, window, "你好")
    run = subprocess.run([sys.executable, "-m", "streamchat", "generate", "--bundle", str(bundle), "--engine",
                          "mindspore", "--greedy", "--max-new-tokens", "8", "--prompt", "你好", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    generated = json.loads(run.stdout)
    assert result.generation.token_ids == generated["token_ids"] and result.response == generated["response"]
    assert [v.text for v in window.transcript.views] == ["你好", result.response]
    _close(window)


# -- the system prompt ------------------------------------------------------------------------------------------------
def test_the_system_prompt_set_in_settings_enters_the_next_prompt(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False))
    dialog = SettingsDialog(window.app, window.model_summary, window)
    editor = dialog.editors["system_prompt"]
    assert isinstance(editor, QPlainTextEdit)
    editor.setPlainText(f"  {SYSTEM}\n")
    dialog.accept()
    assert load_settings().system_prompt == SYSTEM
    window.configure_requested.emit(window._snapshot())
    result = ask(qtbot, window, "你好")
    tokenizer = window.worker.model.tokenizer
    assert result.generation.prompt_ids == tokenizer.encode_prompt(build_prompt("你好", [], SYSTEM))
    assert [v.text for v in window.transcript.views][0] == "你好"  # the system prompt is not a message on screen
    _close(window)


def test_a_system_prompt_too_long_is_said_until_a_shorter_one_answers(qtbot, tiny, app_dirs):
    """The refusal is in the status bar; once a shorter system prompt lets the next question through, the status bar
    names the model again instead of the old error."""
    window = _window(qtbot, _app(lambda s: (setattr(s, "system_prompt", "请记住。" * 400),
                                            setattr(s, "context_budget", 256))), model_loader(tiny, demo=False))
    label = window.status.text()
    assert label == window.model_label
    result = ask(qtbot, window, "你好")
    assert result.generation is None and "the system prompt leaves no room" in window.status.text()
    assert window.save_settings({"system_prompt": SYSTEM})
    window.configure_requested.emit(window._snapshot())
    result = ask(qtbot, window, "你好")
    assert result.generation.token_ids and window.status.text() == label
    _close(window)


# -- menus, shortcuts, text size --------------------------------------------------------------------------------------
def test_the_menu_bar_has_the_actions_and_shortcuts(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False))
    menus = [action.text() for action in window.menuBar().actions()]
    assert menus == ["File", "Edit", "View", "Settings", "Help"]
    shortcuts = {name: [k.toString() for k in action.shortcuts()] for name, action in window.menu_actions.items()}
    assert shortcuts == {"new_chat": ["Ctrl+N"], "choose_model": ["Ctrl+L"], "install_package": [],
                         "export": ["Ctrl+E"], "quit": ["Ctrl+Q"], "copy_answer": ["Ctrl+Shift+C"],
                         "search": ["Ctrl+F"], "bigger": ["Ctrl+=", "Ctrl++"], "smaller": ["Ctrl+-"],
                         "reset_size": ["Ctrl+0"], "live_numbers": ["Ctrl+Shift+L"], "settings": ["Ctrl+,"],
                         "kiosk_settings": ["Ctrl+Shift+K"], "about": []}
    assert all(action in window.actions() for action in window.menu_actions.values())  # work with the menu bar hidden

    answer = ask(qtbot, window, "你好")
    window.menu_actions["copy_answer"].trigger()
    assert QGuiApplication.clipboard().text() == answer.response and answer.response
    window.menu_actions["search"].trigger()
    assert QApplication.focusWidget() is window.search or not window.isActiveWindow()
    window.menu_actions["new_chat"].trigger()
    assert window.current_conversation is None and window.transcript.views == []

    window.menu_actions["about"].trigger()
    [box] = _dialogs(window)
    assert box.text().splitlines() == [f"StreamChat {appliance.__version__}", f"Model: {window.model_label}",
                                       "Engine: onnxruntime", "Device: cpu",
                                       f"CPU kernels: {prompt_kernels.status()}"]
    box.close()

    window.menu_actions["quit"].trigger()
    assert not window.isVisible()


def test_shortcuts_reach_their_actions_from_the_keyboard(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False))
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=5000)
    window.composer.setFocus()
    triggered = []
    for name in ("new_chat", "bigger", "search"):
        window.menu_actions[name].triggered.connect(lambda _=False, name=name: triggered.append(name))
    qtbot.keyClick(window.composer, Qt.Key_N, Qt.ControlModifier)
    qtbot.keyClick(window.composer, Qt.Key_Equal, Qt.ControlModifier)
    qtbot.keyClick(window.composer, Qt.Key_F, Qt.ControlModifier)
    assert triggered == ["new_chat", "bigger", "search"] and window.search.hasFocus()
    _close(window)


def test_the_text_size_changes_within_its_limits_and_persists(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False))
    assert QApplication.font().pointSizeF() == 11
    window.menu_actions["bigger"].trigger()
    window.menu_actions["bigger"].trigger()
    assert QApplication.font().pointSizeF() == 13 and load_settings().font_size == 13
    assert json.loads((app_dirs / "config" / "settings.json").read_text(encoding="utf-8"))["font_size"] == 13
    window.menu_actions["smaller"].trigger()
    assert load_settings().font_size == 12 and AppContext.load().settings.font_size == 12
    window.menu_actions["reset_size"].trigger()
    assert QApplication.font().pointSizeF() == 11 and load_settings().font_size == 11
    window.save_settings({"font_size": 48})
    window.menu_actions["bigger"].trigger()
    assert load_settings().font_size == 48  # the setting's upper limit
    _close(window)


def test_every_menu_and_picker_text_has_chinese(qtbot, app_dirs):
    from PySide6.QtWidgets import QMainWindow

    shell = QMainWindow()
    qtbot.addWidget(shell)
    for name in ("new_conversation", "choose_model", "export_current", "focus_search", "open_settings",
                 "open_kiosk_settings"):
        setattr(shell, name, lambda *a: None)
    actions = build_menus(shell)
    english = [a.text() for a in shell.menuBar().actions()] + [a.text() for a in actions.values()]
    assert [text for text in english + list(ModelPicker.COLUMNS) if text not in ZH_CN] == []
    translators = translators_for("zh_CN")
    for translator in translators:
        QApplication.instance().installTranslator(translator)
    try:
        zh = QMainWindow()
        qtbot.addWidget(zh)
        for name in ("new_conversation", "choose_model", "export_current", "focus_search", "open_settings",
                     "open_kiosk_settings"):
            setattr(zh, name, lambda *a: None)
        build_menus(zh)
        assert [a.text() for a in zh.menuBar().actions()] == ["文件", "编辑", "视图", "设置", "帮助"]
        box = QMessageBox(QMessageBox.Critical, "t", "x", QMessageBox.Ok | QMessageBox.Cancel)
        qtbot.addWidget(box)
        assert [box.button(b).text().replace("&", "") for b in (QMessageBox.Ok, QMessageBox.Cancel)] == ["确定", "取消"]
    finally:
        for translator in translators:
            QApplication.instance().removeTranslator(translator)


# -- kiosk: the operator's settings behind the PIN -----------------------------------------------------------------------
def _pin(qtbot, window, text: str) -> None:
    window.menu_actions["kiosk_settings"].trigger()
    [dialog] = _dialogs(window, QInputDialog)
    dialog.setTextValue(text)
    dialog.accept()


def test_kiosk_settings_open_only_with_the_operator_pin(qtbot, tiny, app_dirs):
    def tweak(s):
        s.kiosk.exit_pin, s.kiosk.idle_timeout_s = "2468", 300

    window = _window(qtbot, _app(tweak), model_loader(tiny, demo=False), kiosk=True)
    assert not window.menuBar().isVisible()
    assert [name for name, action in window.menu_actions.items() if action.isEnabled()] == ["kiosk_settings"]
    _pin(qtbot, window, "1357")
    assert window.statusBar().currentMessage() == "Wrong PIN." and not _dialogs(window, KioskSettingsDialog)

    _pin(qtbot, window, "2468")
    [dialog] = _dialogs(window, KioskSettingsDialog)
    dialog.editors["kiosk.idle_timeout_s"].setValue(60)
    dialog.editors["kiosk.welcome_text"].setPlainText("欢迎！问我关于 StreamChat 的问题。")
    dialog.editors["kiosk.exit_pin"].setText("9999")
    qtbot.mouseClick(dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.Save), Qt.LeftButton)
    saved = load_settings().kiosk
    assert (saved.idle_timeout_s, saved.welcome_text, saved.exit_pin) == (60, "欢迎！问我关于 StreamChat 的问题。", "9999")
    assert saved.font_scale == 1.6 and not saved.enabled  # untouched values stay as they were
    assert window.idle.interval() == 60000 and window.idle.isActive()
    assert window.banner.text() == "欢迎！问我关于 StreamChat 的问题。" and window.banner.isVisibleTo(window)

    _pin(qtbot, window, "2468")  # the old PIN no longer opens them
    assert window.statusBar().currentMessage() == "Wrong PIN." and not _dialogs(window, KioskSettingsDialog)
    QApplication.instance().setProperty("operator_exit", True)
    _close(window)


def test_a_kiosk_without_a_pin_has_no_operator_access(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False), kiosk=True)
    window.menu_actions["kiosk_settings"].trigger()
    assert not _dialogs(window, QInputDialog) and not _dialogs(window, KioskSettingsDialog)
    assert window.statusBar().currentMessage() == "No operator PIN is set (kiosk.exit_pin in settings.json)."
    QApplication.instance().setProperty("operator_exit", True)
    _close(window)


def test_outside_kiosk_mode_the_kiosk_settings_open_for_setting_a_first_pin(qtbot, tiny, app_dirs):
    window = _window(qtbot, _app(), model_loader(tiny, demo=False))
    window.menu_actions["kiosk_settings"].trigger()
    [dialog] = _dialogs(window, KioskSettingsDialog)
    assert list(dialog.editors) == ["kiosk.enabled", "kiosk.idle_timeout_s", "kiosk.keep_history", "kiosk.exit_pin",
                                    "kiosk.font_scale", "kiosk.welcome_text"]
    dialog.editors["kiosk.exit_pin"].setText("1234")
    dialog.accept()
    assert load_settings().kiosk.exit_pin == "1234"
    window.menu_actions["kiosk_settings"].trigger()  # now behind the PIN
    assert _dialogs(window, QInputDialog) and len(_dialogs(window, KioskSettingsDialog)) == 0
    _close(window)

