"""Errors a user must act on, as a modal dialog that does not stop the event loop (the worker's signals keep arriving;
a test finds it as a QMessageBox child of ``parent`` and closes it). Everything else goes to the status bar."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox, QWidget


def alert(parent: QWidget, title: str, text: str) -> QMessageBox:
    """Show ``text`` (an error's one line, which carries its advice) modal to ``parent``'s window; deleted when closed."""
    box = QMessageBox(QMessageBox.Critical, title, text, QMessageBox.Ok, parent)
    box.setAttribute(Qt.WA_DeleteOnClose)
    box.setWindowModality(Qt.WindowModal)
    box.open()
    return box
