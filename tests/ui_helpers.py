"""What the window's tests share: a window on a model, a question answered through the composer, a window closed with
its worker stopped, and an engine slowed down to a slow machine's pace. Import it after ``importorskip("PySide6")``."""

from __future__ import annotations

import time
from collections.abc import Callable

from ui.main_window import MainWindow


def open_window(qtbot, app, loader, kiosk: bool = False, loaded: bool = True) -> MainWindow:
    """The window on ``app`` with ``loader``'s model, shown (a kiosk shows itself full screen), its model loaded."""
    window = MainWindow(app, loader, kiosk=kiosk)
    qtbot.addWidget(window)
    if not kiosk:
        window.show()
    if loaded:
        qtbot.waitUntil(lambda: window.model_label != "", timeout=60000)
    return window


def ask(qtbot, window: MainWindow, question: str):
    """Send ``question`` through the composer and wait for the answer; the TurnResult."""
    window.composer.setPlainText(question)
    with qtbot.waitSignal(window.answer_finished, timeout=60000) as finished:
        window.send_current()
    return finished.args[0]


def stop_worker(window: MainWindow) -> None:
    window.stop()
    window.thread.quit()
    window.thread.wait(5000)


class PacedSequence:
    """A real sequence whose decode steps first keep this thread busy for ``burn(step)`` seconds: a slow machine."""

    def __init__(self, sequence, burn: Callable[[int], float]) -> None:
        self.sequence, self.burn, self.steps = sequence, burn, 0

    def prefill(self, *args):
        return self.sequence.prefill(*args)

    def step(self, *args):
        self.steps += 1
        end = time.perf_counter() + self.burn(self.steps)
        while time.perf_counter() < end:
            pass
        return self.sequence.step(*args)


class PacedEngine:
    def __init__(self, engine, burn: Callable[[int], float]) -> None:
        self.engine, self.burn = engine, burn

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def start(self) -> PacedSequence:
        return PacedSequence(self.engine.start(), self.burn)
