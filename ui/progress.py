"""A progress line for the status bar: what is happening, and a bar (a moving busy bar when the work gives no
fractions, as a model load does: its stages are lines of text)."""

from __future__ import annotations

from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QWidget


class ProgressLine(QWidget):
    """Stage text beside a bar; hidden until the first stage, and again when the work is done."""

    def __init__(self) -> None:
        super().__init__()
        self.text = QLabel()
        self.bar = QProgressBar()
        self.bar.setTextVisible(False)
        self.bar.setMaximumWidth(160)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.text, 1)
        row.addWidget(self.bar)
        self.hide()

    def busy(self, text: str) -> None:
        """A stage without a fraction: the bar moves to and fro (range 0..0)."""
        self.text.setText(text)
        self.bar.setRange(0, 0)
        self.show()

    def fraction(self, text: str, done: int, total: int) -> None:
        self.text.setText(text)
        self.bar.setRange(0, max(total, 1))
        self.bar.setValue(min(done, total))
        self.show()

    def done(self) -> None:
        self.hide()
        self.text.clear()
