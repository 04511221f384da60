"""Render ui/assets/streamchat.svg to the PNGs the window and the .deb use (48, 128 and 256 pixels), with Qt's SVG
renderer; tests/test_ui_look.py checks that the committed PNGs are these renders.

    QT_QPA_PLATFORM=offscreen .venv/bin/python tools/render_icon.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QGuiApplication, QImage, QPainter  # noqa: E402
from PySide6.QtSvg import QSvgRenderer  # noqa: E402

from ui.theme import ASSETS, ICON_SIZES  # noqa: E402


def render(size: int) -> QImage:
    """The icon at ``size`` x ``size`` pixels, on transparency."""
    image = QImage(size, size, QImage.Format_ARGB32_Premultiplied)
    image.fill(Qt.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.Antialiasing)
    QSvgRenderer(str(ASSETS / "streamchat.svg")).render(painter)
    painter.end()
    return image


def main() -> int:
    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # noqa: F841 - Qt needs one for fonts/painting
    for size in ICON_SIZES:
        path = ASSETS / f"streamchat-{size}.png"
        if not render(size).save(str(path)):
            print(f"error: cannot write {path}", file=sys.stderr)
            return 1
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
