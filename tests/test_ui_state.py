"""The window and its worker share no state: requests go as signals, results (timings included) come back as signal
payloads; settings and reloaded safety lists reach the live session; the UI imports neither the CLI nor the exporter."""

import ast
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QTimer, SignalInstance  # noqa: E402
from PySide6.QtWidgets import QApplication, QMessageBox, QPushButton  # noqa: E402

from appliance.app import AppContext  # noqa: E402
from appliance.errors import BundleError, StreamChatError  # noqa: E402
from appliance.history import History, HistoryError  # noqa: E402
from appliance.loading import DEMO_QUANT, demo_bundle  # noqa: E402
from model_export.export import export_bundle  # noqa: E402
from ui.app import model_loader  # noqa: E402
from ui.main_window import MainWindow  # noqa: E402
from ui.messages import t  # noqa: E402
from ui.settings_dialog import SettingsDialog  # noqa: E402
from ui.worker import ChatWorker  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _window(qtbot, bundle):
    """A window on ``bundle`` answering deterministically (top-k 1); ``loads`` counts every model (re)load."""
    app = AppContext.load()
    app.settings.generation.top_k, app.settings.generation.max_new_tokens = 1, 24
    window = MainWindow(app, model_loader(bundle, demo=False))
    qtbot.addWidget(window)
    loads = []
    window.model_ready.connect(lambda: loads.append(window.model_label))
    qtbot.waitUntil(lambda: bool(loads), timeout=60000)
    return window, loads


def _ask(qtbot, window, question):
    window.composer.setPlainText(question)
    with qtbot.waitSignal(window.answer_finished, timeout=60000) as finished:
        window.send_current()
    return finished.args[0]


def _in_settings(window, action):
    """Open Settings as the user does (modal) and run ``action(dialog)`` inside it; ``action`` closes the dialog."""
    def act():
        dialog = next(w for w in QApplication.topLevelWidgets() if isinstance(w, SettingsDialog) and w.isVisible())
        action(dialog)

    QTimer.singleShot(0, act)
    window.open_settings()


def _click(dialog, label):
    next(b for b in dialog.findChildren(QPushButton) if b.text() == t(label)).click()


def test_reloaded_safety_list_masks_the_very_next_answer_without_reloading_the_model(qtbot, tiny, app_dirs):
    window, loads = _window(qtbot, tiny)
    before = _ask(qtbot, window, "你好")
    word = re.search(r"\w{2}", before.response).group()  # a word the model really writes
    lists = app_dirs / "config" / "safety"
    lists.mkdir(parents=True)
    (lists / "operator.txt").write_text(f"{word}\n", encoding="utf-8")

    _in_settings(window, lambda dialog: (_click(dialog, "Reload"), dialog.reject()))  # Reload, then Cancel
    window.new_conversation()
    after = _ask(qtbot, window, "你好")

    assert word not in after.response
    assert after.response == window.app.rules.mask(before.response) != before.response
    assert loads == [window.model_label]  # the model was not reloaded


def test_a_reload_whose_model_fails_to_open_still_reaches_the_running_chat(qtbot, tiny, app_dirs):
    """One Save both reloads the safety list and changes the context budget, and reopening the model then fails (the
    disk holding the bundle went away, say): the chat goes on with the model it has, and with the new list."""
    opens, calls = model_loader(tiny, demo=False), []

    def first_time_only(settings, progress):
        calls.append(settings.context_budget)
        if len(calls) > 1:
            raise StreamChatError("the bundle's disk is gone")
        return opens(settings, progress)

    app = AppContext.load()
    app.settings.generation.top_k, app.settings.generation.max_new_tokens = 1, 24
    window = MainWindow(app, first_time_only)
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: window.model_label != "", timeout=60000)
    before = _ask(qtbot, window, "你好")
    word = re.search(r"\w{2}", before.response).group()
    (app_dirs / "config" / "safety").mkdir(parents=True)
    (app_dirs / "config" / "safety" / "operator.txt").write_text(f"{word}\n", encoding="utf-8")
    window.app.settings.context_budget = 128
    with qtbot.waitSignal(window.worker.failed, timeout=60000) as failed:
        _in_settings(window, lambda dialog: (_click(dialog, "Reload"), dialog.accept()))
    assert failed.args[0] == "the bundle's disk is gone" and calls == [2048, 128]
    window.new_conversation()
    after = _ask(qtbot, window, "你好")
    assert word not in after.response and after.response == window.app.rules.mask(before.response)


def test_saved_settings_reach_the_next_answer_and_a_new_context_budget_reopens_the_model(qtbot, tiny, app_dirs):
    window, loads = _window(qtbot, tiny)
    window.app.settings.generation.max_new_tokens = 3  # the window's copy: the worker keeps its own until Save
    assert len(_ask(qtbot, window, "你好").generation.token_ids) == 24
    _in_settings(window, lambda dialog: dialog.accept())  # Save
    assert len(_ask(qtbot, window, "你好").generation.token_ids) == 3
    assert len(loads) == 1

    window.app.settings.context_budget = 128
    _in_settings(window, lambda dialog: dialog.accept())
    qtbot.waitUntil(lambda: len(loads) == 2, timeout=60000)  # the KV cache is sized when the model is opened
    assert json.loads((app_dirs / "config" / "settings.json").read_text())["context_budget"] == 128


def test_a_moved_data_folder_takes_the_next_conversation_without_reloading_the_model(qtbot, tiny, app_dirs, monkeypatch):
    monkeypatch.delenv("STREAMCHAT_DATA_DIR")  # it would win over the setting
    (app_dirs / "config").mkdir()
    (app_dirs / "config" / "settings.json").write_text(json.dumps({"data_dir": str(app_dirs / "data")}))
    window, loads = _window(qtbot, tiny)
    _ask(qtbot, window, "你好")
    before = window.app.history
    moved = copy.deepcopy(window.app.settings)
    moved.data_dir = str(app_dirs / "moved")
    _in_settings(window, lambda dialog: (window.app.apply_settings(moved), dialog.reject()))  # as the dialog's Save does
    answer = _ask(qtbot, window, "你好")
    assert window.app.history.path.parent == app_dirs / "moved"
    assert [m.text for m in window.app.history.messages(answer.conversation_id)] == ["你好", answer.response]
    assert len(before.conversations()) == 1 and window.conversations.count() == 1
    assert loads == [window.model_label]


def test_timings_arrive_as_a_signal_payload_and_the_speed_label_shows_them(qtbot, tiny, app_dirs):
    window, _ = _window(qtbot, tiny)
    window.composer.setPlainText("你好")
    with qtbot.waitSignal(window.worker.finished, timeout=60000) as finished:
        window.send_current()
    result, first_token_s = finished.args
    gen = result.generation
    assert 0 < first_token_s < 60 and gen.decode_ms_per_token > 0
    qtbot.waitUntil(lambda: not window.answering)
    assert window.speed.text() == t("first token {0:.2f} s · {1:.1f} tokens/s").format(first_token_s,
                                                                                      1000 / gen.decode_ms_per_token)


def test_a_send_while_no_model_is_loaded_is_answered_and_the_window_stays_usable(qtbot, tiny, app_dirs):
    """Every send gets one ``finished``: without a model it says so, and after a reload the window answers again."""
    app = AppContext.load()
    app.settings.generation.max_new_tokens = 12  # sampled on random weights: the answer ends here, if not at <eop>
    opens = model_loader(tiny, demo=False)
    calls = []

    def loader(settings, progress):
        calls.append(settings)
        if len(calls) == 1:
            raise BundleError("no bundle yet")
        return opens(settings, progress)

    window = MainWindow(app, loader)
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: "no bundle yet" in window.status.text(), timeout=10000)
    refused = _ask(qtbot, window, "你好")
    assert (refused.stopped, refused.blocked_reason, window.answering) == ("error", "the model is not loaded", False)
    with qtbot.waitSignal(window.model_ready, timeout=60000):
        window.reload_model()
    assert _ask(qtbot, window, "你好").stopped in ("eos", "max_new_tokens")


def test_the_window_uses_only_the_workers_signals_and_slots():
    """The GUI thread never reads or writes an attribute of the worker: it connects its signals and slots, nothing else
    (``moveToThread`` before the thread starts)."""
    tree = ast.parse((REPO / "ui" / "main_window.py").read_text(encoding="utf-8"))
    slots = {node.args[0].attr for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
             and isinstance(node.args[0], ast.Attribute) and ast.unparse(node.args[0].value) == "self.worker"}
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self.worker"}
    signals = {name for name in used if isinstance(getattr(ChatWorker(*[None] * 3), name, None), SignalInstance)}
    assert used - signals - slots == {"moveToThread"}
    assert slots == {"send", "load", "open_conversation", "configure", "shut_down"}


def test_messages_a_full_disk_refused_are_reported_when_the_window_closes(qtbot, tiny, app_dirs, monkeypatch):
    window, _ = _window(qtbot, tiny)

    def full(self, *args, **kwargs):
        raise HistoryError(f"the disk holding {self.path} is full: nothing was saved; free space and try again",
                           f"the disk holding {self.path} is full", "free space")

    monkeypatch.setattr(History, "add_message", full)
    shown = []
    monkeypatch.setattr(QMessageBox, "critical", lambda parent, title, text: shown.append(text))
    _ask(qtbot, window, "你好")
    window.close()
    assert shown == [f"the disk holding {window.app.history.path} is full: 2 messages of this chat could not be saved"]


IMPORT_GRAPH = """import json, sys
import ui.app, ui.main_window, ui.settings_dialog, ui.worker
imported = set(sys.modules)
from appliance.settings import Settings
loaded = ui.app.model_loader(None, demo=True)(Settings(), lambda line: None)
top = lambda names: sorted({name.split(".")[0] for name in names} & {"streamchat", "model_export"})
print(json.dumps({"demo": loaded.summary["demo"], "imported": top(imported), "running": top(sys.modules)}))
"""


def test_the_ui_imports_neither_the_cli_nor_the_exporter(app_dirs):
    """``ui`` imports no ``streamchat`` and no ``model_export``, and opens a prepared demo bundle without them (``onnx``
    it does need: opening a bundle reads its graphs' external-data locations, see docs/security.md)."""
    env = {**os.environ, "STREAMCHAT_CONFIG_DIR": str(app_dirs / "config"), "STREAMCHAT_DATA_DIR": str(app_dirs / "data"),
           "STREAMCHAT_CACHE_DIR": str(app_dirs / "cache"), "QT_QPA_PLATFORM": "offscreen"}
    prepared = demo_bundle(app_dirs / "data", export_bundle)
    assert prepared.name == f"streamchat-demo-{DEMO_QUANT}"
    run = subprocess.run([sys.executable, "-c", IMPORT_GRAPH], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    graph = json.loads(run.stdout)
    assert graph["demo"] is True and graph["imported"] == []
    assert graph["running"] == [], "loading the INT8 demo bundle imported these"
