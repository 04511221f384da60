"""Screenshots of the real window for the docs: a conversation with a code block in the light and the dark theme, in
Chinese and in English, the Live numbers panel after the English conversation's answer, and kiosk mode.

    xvfb-run -a -s "-screen 0 1280x800x24" .venv/bin/python tools/screenshots.py [--out DIR]

Uses the built-in demo model with a throwaway config and data folder; needs a CJK font (Debian: fonts-noto-cjk). Each
conversation starts with a stored turn whose answer holds a code block (the demo model writes no code), then the demo
model answers a question live; the window is pictured in the light theme, switched to dark while it runs, and pictured
again. Prints the Qt platform it ran on and the files it wrote, and exits: 0 when every image was written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DOCS = Path(__file__).resolve().parent.parent / "docs"
TIMEOUT_MS = 180000
CONVERSATIONS = {
    "zh_CN": ("导出模型包", "怎么把 ChatGLM-6B 导出成模型包？",
              "在存放 ChatGLM-6B 检查点的电脑上运行 `streamchat export`，它会转换并校验模型包：\n\n"
              "```bash\nstreamchat export ./chatglm-6b --out ./chatglm-6b-int4 --quant int4\n"
              "streamchat verify ./chatglm-6b-int4\n```\n\n"
              "然后在 **设置 → 模型包** 中打开这个文件夹，或者用 `streamchat gui --bundle ./chatglm-6b-int4` 启动。",
              "StreamChat 是什么？"),
    "en": ("Export a bundle", "How do I export ChatGLM-6B as a model bundle?",
           "Run `streamchat export` on the machine that holds the ChatGLM-6B checkpoint; it converts and verifies the "
           "bundle:\n\n```bash\nstreamchat export ./chatglm-6b --out ./chatglm-6b-int4 --quant int4\n"
           "streamchat verify ./chatglm-6b-int4\n```\n\n"
           "Then open that folder in **Settings → Model bundle**, or start with "
           "`streamchat gui --bundle ./chatglm-6b-int4`.",
           "What is StreamChat?"),
}
SHOTS = {"zh_CN": ("screenshot-chat.png", "screenshot-chat-dark.png"),
         "en": ("screenshot-chat-en.png", "screenshot-chat-en-dark.png")}
KIOSK = "screenshot-kiosk.png"
LIVE = "screenshot-live-numbers.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshots of the chat window (both themes, zh and en) and kiosk "
                                                 "mode for the docs.")
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
    from ui.live_numbers import toggle_live_numbers
    from ui.main_window import MainWindow
    from ui.theme import apply_theme

    qt = QApplication(sys.argv[:1])
    print(f"platform {qt.platformName()}", flush=True)
    shots: list[str] = []
    held: list = []  # translators (Qt does not own an installed one) and windows, alive until the end
    steps = [*SHOTS, "kiosk"]

    def use_language(language: str) -> None:
        for translator in held[:]:
            if not isinstance(translator, MainWindow):
                qt.removeTranslator(translator)
                held.remove(translator)
        for translator in translators_for(language):
            qt.installTranslator(translator)
            held.append(translator)

    def window(language: str, kiosk: bool) -> MainWindow:
        use_language(language)
        app = AppContext.load()
        app.settings.generation.top_k = 1  # greedy: the same answer every run
        app.settings.theme = "light"
        w = MainWindow(app, model_loader(None, demo=True, export=export_demo), kiosk=kiosk)
        held.append(w)
        w.resize(1200, 800)
        if not kiosk:
            w.show()
        return w

    def picture(w: MainWindow, name: str) -> None:
        for _ in range(5):  # the transcript follows the answer to its end
            qt.processEvents()
        if w.grab().save(str(out / name)):
            shots.append(name)

    def chat(language: str) -> None:
        title, question, answer, live = CONVERSATIONS[language]
        w = window(language, kiosk=False)
        for stored in w.app.history.conversations():  # the other language's
            w.app.history.delete(stored.id)
        cid = w.app.history.new_conversation(title)
        w.app.history.add_message(cid, "user", question)
        w.app.history.add_message(cid, "assistant", answer)
        w.refresh_sidebar()

        def ready() -> None:
            w.open_conversation(cid)
            w.conversations.setCurrentRow(0)
            w.composer.setPlainText(live)
            w.send_current()

        def answered(_result) -> None:
            light, dark = SHOTS[language]
            picture(w, light)
            apply_theme("dark")  # as the Settings dialog or the desktop switches it, on the running window
            picture(w, dark)
            apply_theme("light")
            if language != "en":
                w.hide()
                QTimer.singleShot(0, next_step)
                return
            panel = toggle_live_numbers(w)

            def live() -> None:  # after one process sample (the CPU share needs an interval)
                if panel.grab().save(str(out / LIVE)):
                    shots.append(LIVE)
                w.hide()
                next_step()

            QTimer.singleShot(1200, live)

        w.model_ready.connect(ready)
        w.answer_finished.connect(answered)

    def kiosk_shot() -> None:
        w = window("zh_CN", kiosk=True)
        count = {"n": 0}

        def on_delta(_text: str) -> None:
            count["n"] += 1
            if count["n"] == 6:  # mid-answer: the answer is still streaming
                picture(w, KIOSK)
                QTimer.singleShot(300, next_step)

        w.delta_shown.connect(on_delta)
        w.model_ready.connect(lambda: (w.composer.setPlainText("怎么退出 kiosk 模式？"), w.send_current()))

    def next_step() -> None:
        if not steps:
            qt.exit(0)  # not quit(): Qt 6's quit() first asks every window to close, and the kiosk window refuses
            return
        step = steps.pop(0)
        kiosk_shot() if step == "kiosk" else chat(step)

    QTimer.singleShot(0, next_step)
    QTimer.singleShot(TIMEOUT_MS, lambda: qt.exit(1))
    qt.exec()
    print("wrote", ", ".join(str(out / s) for s in shots), flush=True)
    return 0 if len(shots) == 2 * len(SHOTS) + 2 else 1


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)  # skip finalisation: PySide6 can abort while collecting its wrappers at shutdown
