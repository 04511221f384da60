"""Screenshots of the real window for the docs: a Chinese conversation mid-answer, and kiosk mode.

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python tools/screenshots.py [--out DIR]

Uses the built-in demo model with a throwaway config and data folder; needs a CJK font (Debian: fonts-noto-cjk).
Prints the Qt platform it ran on and the files it wrote, and exits: 0 when both images were written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
TIMEOUT_MS = 120000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshots of the chat window and kiosk mode for the docs.")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the images (default: docs/)")
    out = parser.parse_args(argv).out
    tmp = Path(tempfile.mkdtemp())
    os.environ.update(STREAMCHAT_CONFIG_DIR=str(tmp / "config"), STREAMCHAT_DATA_DIR=str(tmp / "data"),
                      STREAMCHAT_CACHE_DIR=str(tmp / "cache"))
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from appliance.app import AppContext
    from streamchat.models import export_demo
    from ui.app import model_loader
    from ui.i18n import translators_for
    from ui.main_window import MainWindow

    qt = QApplication(sys.argv[:1])
    print(f"platform {qt.platformName()}", flush=True)
    translators = translators_for("zh_CN")  # held: Qt does not own an installed translator
    for translator in translators:
        qt.installTranslator(translator)
    shots = []

    def window(kiosk: bool) -> MainWindow:
        app = AppContext.load()
        app.settings.generation.temperature = 0.3
        w = MainWindow(app, model_loader(None, demo=True, export=export_demo), kiosk=kiosk)
        w.resize(1100, 720)
        if not kiosk:
            w.show()
        return w

    chat = window(kiosk=False)

    def ask(w: MainWindow, questions: list[str], shot: str, after_deltas: int) -> None:
        count = {"n": 0}

        def on_delta(_):
            if len(questions) == 1:  # the last question is the one pictured
                count["n"] += 1
            if count["n"] == after_deltas:
                w.grab().save(str(out / shot))  # mid-answer: the answer is still streaming
                shots.append(shot)
                QTimer.singleShot(500, next_step)

        def on_finished(_):
            questions.pop(0)
            if questions:
                w.composer.setPlainText(questions[0])
                w.send_current()

        w.delta_shown.connect(on_delta)
        w.answer_finished.connect(on_finished)
        w.composer.setPlainText(questions[0])
        w.send_current()

    def next_step() -> None:
        if len(shots) == 1:
            kiosk = window(kiosk=True)
            kiosk.model_ready.connect(lambda: ask(kiosk, ["怎么退出 kiosk 模式？"], "screenshot-kiosk.png", 6))
        else:
            qt.exit(0)  # not quit(): Qt 6's quit() first asks every window to close, and the kiosk window refuses

    chat.model_ready.connect(lambda: ask(chat, ["如何导出真正的模型？", "导出以后怎么用？"],
                                             "screenshot-chat.png", 10))
    QTimer.singleShot(TIMEOUT_MS, lambda: qt.exit(1))
    qt.exec()
    print("wrote", ", ".join(str(out / s) for s in shots), flush=True)
    return 0 if len(shots) == 2 else 1


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)  # skip finalisation: PySide6 can abort while collecting its wrappers at shutdown
