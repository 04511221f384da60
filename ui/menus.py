"""The window's menu bar and its shortcuts, and the small commands that live only there (copy the last answer, text
size, About).

Every action is also added to the window itself, so its shortcut works wherever the focus is and while the menu bar is
hidden; in kiosk mode the menu bar is hidden and every action but the operator's (Kiosk settings, behind the PIN) is
disabled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QGuiApplication, QKeySequence
from PySide6.QtWidgets import QMessageBox

import appliance
from appliance.settings import BY_KEY
from ui.live_numbers import toggle_live_numbers
from ui.messages import t

if TYPE_CHECKING:
    from ui.main_window import MainWindow

FONT_SIZE = BY_KEY["font_size"]
KIOSK_ACTION = "kiosk_settings"  # the one action a kiosk keeps (it asks for the operator PIN)


def build_menus(window: MainWindow) -> dict[str, QAction]:
    """Fill ``window``'s menu bar; the actions by name (File, Edit, View, Settings, Help, in menu order)."""
    menus = {
        "File": [("new_chat", "New chat", window.new_conversation, ("Ctrl+N",)),
                 ("choose_model", "Choose model...", window.choose_model, ("Ctrl+L",)),
                 ("install_package", "Install bundle package...", lambda: window.choose_model(install=True), ()),
                 ("export", "Export conversation...", window.export_current, ("Ctrl+E",)),
                 None,
                 ("quit", "Quit", window.close, ("Ctrl+Q",))],
        "Edit": [("copy_answer", "Copy last answer", lambda: copy_last_answer(window), ("Ctrl+Shift+C",)),
                 ("search", "Search conversations", window.focus_search, ("Ctrl+F",))],
        "View": [("bigger", "Bigger text", lambda: change_font_size(window, +1), ("Ctrl+=", "Ctrl++")),
                 ("smaller", "Smaller text", lambda: change_font_size(window, -1), ("Ctrl+-",)),
                 ("reset_size", "Reset text size", lambda: change_font_size(window, 0), ("Ctrl+0",)),
                 None,
                 ("live_numbers", "Live numbers", lambda: toggle_live_numbers(window), ("Ctrl+Shift+L",))],
        "Settings": [("settings", "Settings...", window.open_settings, ("Ctrl+,",)),
                     (KIOSK_ACTION, "Kiosk settings...", window.open_kiosk_settings, ("Ctrl+Shift+K",))],
        "Help": [("about", "About StreamChat", lambda: about(window), ())],
    }
    actions: dict[str, QAction] = {}
    for title, entries in menus.items():
        menu = window.menuBar().addMenu(t(title))
        for entry in entries:
            if entry is None:
                menu.addSeparator()
                continue
            name, label, slot, keys = entry
            action = QAction(t(label), window)
            action.setShortcuts([QKeySequence(key) for key in keys])
            action.setShortcutContext(Qt.WindowShortcut)
            action.triggered.connect(slot)
            menu.addAction(action)
            window.addAction(action)  # the shortcut works with the menu bar hidden too
            actions[name] = action
    return actions


def copy_last_answer(window: MainWindow) -> None:
    answers = [view for view in window.transcript.views if view.role == "assistant" and view.text]
    if not answers:
        window.statusBar().showMessage(t("There is no answer to copy yet."), 4000)
        return
    QGuiApplication.clipboard().setText(answers[-1].text)
    window.statusBar().showMessage(t("The last answer was copied."), 3000)


def change_font_size(window: MainWindow, step: int) -> None:
    """One point bigger (+1) or smaller (-1) within the setting's limits, or back to the default (0); saved."""
    low, high = FONT_SIZE.limits
    size = FONT_SIZE.default if step == 0 else int(min(high, max(low, window.app.settings.font_size + step)))
    if size != window.app.settings.font_size and window.save_settings({"font_size": size}):
        window.apply_font()


def about_text(window: MainWindow) -> str:
    """Version, the loaded model, its engine and the CPU kernels' state."""
    from appliance.kernels import prompt_kernels

    summary = window.model_summary
    lines = [f"StreamChat {appliance.__version__}",
             t("Model: {0}").format(window.model_label or t("not loaded")),
             t("Engine: {0}").format(summary.get("engine") or "—"),
             t("Device: {0}").format(summary.get("device") or "—"),
             t("CPU kernels: {0}").format(prompt_kernels.status())]
    return "\n".join(lines)


def about(window: MainWindow) -> QMessageBox:
    box = QMessageBox(QMessageBox.Information, t("About StreamChat"), about_text(window), QMessageBox.Ok, window)
    box.setAttribute(Qt.WA_DeleteOnClose)
    box.open()
    return box
