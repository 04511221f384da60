"""The operator's side of kiosk mode: the PIN gate, and the kiosk's settings (PIN, idle timeout, welcome text, ...)
edited in the app instead of only in settings.json.

The gate asks for ``kiosk.exit_pin`` without stopping the event loop (the worker's signals keep arriving); a wrong PIN
is refused in the status bar and opens nothing. A kiosk without a PIN has no operator access from the screen (as it
has no exit); outside kiosk mode, with no PIN set, the settings open at once, so a PIN can be set.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDialog, QFormLayout, QInputDialog, QLineEdit

from appliance.settings import section, value_of
from ui.messages import t
from ui.settings_dialog import lay_out_with_save, setting_widget, widget_value

if TYPE_CHECKING:
    from ui.main_window import MainWindow

KIOSK_SETTINGS = tuple(st for st in section("kiosk") if st.label)


def with_operator_pin(window: MainWindow, then: Callable[[], None]) -> QInputDialog | None:
    """Run ``then`` once the operator has typed the kiosk PIN (see the module docstring); the PIN dialog, if one opened."""
    pin = window.app.settings.kiosk.exit_pin
    if not pin:
        if window.kiosk:
            window.statusBar().showMessage(t("No operator PIN is set (kiosk.exit_pin in settings.json)."), 5000)
        else:
            then()
        return None
    dialog = QInputDialog(window)
    dialog.setWindowTitle(t("Operator"))
    dialog.setLabelText(t("PIN"))
    dialog.setTextEchoMode(QLineEdit.Password)
    dialog.setAttribute(Qt.WA_DeleteOnClose)

    def entered(text: str) -> None:
        if hmac.compare_digest(text.encode(), pin.encode()):
            then()
        else:
            window.statusBar().showMessage(t("Wrong PIN."), 5000)

    dialog.textValueSelected.connect(entered)
    dialog.open()
    return dialog


class KioskSettingsDialog(QDialog):
    """One row per kiosk setting; Save goes through ``MainWindow.save_settings`` (saved first, then applied)."""

    def __init__(self, window: MainWindow) -> None:
        super().__init__(window)
        self.window_ = window
        self.setWindowTitle(t("Kiosk settings"))
        settings = window.app.settings
        self.editors = {st.key: setting_widget(st, value_of(settings, st.key)) for st in KIOSK_SETTINGS}
        self.editors["kiosk.exit_pin"].setEchoMode(QLineEdit.PasswordEchoOnEdit)
        self.shown = {key: widget_value(widget) for key, widget in self.editors.items()}
        form = QFormLayout()
        for setting in KIOSK_SETTINGS:
            form.addRow(t(setting.label), self.editors[setting.key])
        lay_out_with_save(self, form)

    def edited(self) -> dict:
        return {key: widget_value(widget) for key, widget in self.editors.items()
                if widget_value(widget) != self.shown[key]}

    def accept(self) -> None:
        if self.window_.save_settings(self.edited()):
            self.window_.apply_kiosk_settings()
            super().accept()
