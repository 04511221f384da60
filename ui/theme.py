"""The look: light and dark colours, the style sheet of the chat surface, the font stacks and the app icon.

The ``theme`` setting chooses: ``system`` follows the desktop (``QStyleHints.colorScheme()``, and its change signal
while the app runs; a desktop that says nothing gets the light theme), ``light`` and ``dark`` override it. Qt's Fusion
style draws the standard widgets from the palette on every platform, so both themes look the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Qt
from PySide6.QtGui import QColor, QIcon, QPalette
from PySide6.QtWidgets import QApplication

ASSETS = Path(__file__).resolve().parent / "assets"
ICON_SIZES = (48, 128, 256)  # the PNG renders of assets/streamchat.svg (tools/render_icon.py)
FOLLOWER = "streamchat-theme"
# Sans-serif faces: a Latin face where one of these is installed, then Simplified Chinese faces of each platform
# (Noto Sans CJK SC before the fontconfig default, which may pick the Japanese forms of shared characters).
SANS = ["Inter", "Segoe UI", "Noto Sans", "Cantarell", "Noto Sans CJK SC", "Source Han Sans SC", "Microsoft YaHei UI",
        "PingFang SC", "Hiragino Sans GB", "WenQuanYi Micro Hei", "DejaVu Sans"]


@dataclass(frozen=True)
class Colors:
    window: str  # sidebar and chrome
    surface: str  # the transcript
    base: str  # text fields, lists
    text: str
    muted: str  # names, actions, status
    border: str
    hover: str
    accent: str
    on_accent: str
    user_bubble: str
    assistant_bubble: str
    code: str  # code block body
    code_header: str
    selection: str  # the selected conversation
    banner: str


THEMES = {
    "light": Colors(window="#f3f4f6", surface="#ffffff", base="#ffffff", text="#1d2129", muted="#6b7280",
                    border="#dfe2e7", hover="#e8eaee", accent="#3366e6", on_accent="#ffffff", user_bubble="#e6eeff",
                    assistant_bubble="#f4f5f7", code="#fafbfc", code_header="#e9ecf1", selection="#dfe7fb",
                    banner="#fff4d6"),
    "dark": Colors(window="#1d1e21", surface="#161719", base="#25262a", text="#e4e6eb", muted="#9aa1ab",
                   border="#34363c", hover="#2e3035", accent="#4f7dff", on_accent="#ffffff", user_bubble="#233456",
                   assistant_bubble="#212226", code="#121315", code_header="#2b2d32", selection="#2a3857",
                   banner="#3d3420"),
}


def palette(c: Colors) -> QPalette:
    """The standard widgets' colours (Fusion draws from these), disabled text included."""
    p = QPalette()
    roles = {QPalette.Window: c.window, QPalette.WindowText: c.text, QPalette.Base: c.base,
             QPalette.AlternateBase: c.window, QPalette.Text: c.text, QPalette.Button: c.base,
             QPalette.ButtonText: c.text, QPalette.Highlight: c.accent, QPalette.HighlightedText: c.on_accent,
             QPalette.Link: c.accent, QPalette.LinkVisited: c.accent, QPalette.PlaceholderText: c.muted,
             QPalette.ToolTipBase: c.base, QPalette.ToolTipText: c.text, QPalette.BrightText: "#ff5555",
             QPalette.Light: c.base, QPalette.Midlight: c.hover, QPalette.Mid: c.border, QPalette.Dark: c.border,
             QPalette.Shadow: "#000000"}
    for role, colour in roles.items():
        p.setColor(role, QColor(colour))
    for role in (QPalette.WindowText, QPalette.Text, QPalette.ButtonText):
        p.setColor(QPalette.Disabled, role, QColor(c.muted))
    return p


def style_sheet(c: Colors) -> str:
    """The chat surface: bubbles, code blocks, composer, sidebar; the widgets name themselves (objectName)."""
    return f"""
QScrollArea#transcript, QWidget#transcriptInner {{ background: {c.surface}; border: none; }}
QFrame#bubble[role="user"] {{ background: {c.user_bubble}; border-radius: 16px; }}
QFrame#bubble[role="assistant"] {{ background: {c.assistant_bubble}; border: 1px solid {c.border};
    border-radius: 16px; }}
QTextEdit#messageBody {{ background: transparent; border: none; }}
QLabel#speaker {{ color: {c.muted}; }}
QPushButton#messageAction, QPushButton#copyCode {{ background: transparent; border: none; color: {c.muted};
    padding: 2px 8px; border-radius: 6px; }}
QPushButton#messageAction:hover, QPushButton#copyCode:hover {{ background: {c.hover}; color: {c.text}; }}
QWidget#codeHeader {{ background: {c.code_header}; border-top-left-radius: 8px; border-top-right-radius: 8px; }}
QLabel#codeLanguage {{ color: {c.muted}; }}
QPushButton {{ background: {c.base}; color: {c.text}; border: 1px solid {c.border}; border-radius: 8px;
    padding: 6px 14px; }}
QPushButton:hover {{ background: {c.hover}; }}
QPushButton:disabled {{ color: {c.muted}; }}
QPushButton#primary {{ background: {c.accent}; color: {c.on_accent}; border: none; }}
QPushButton#primary:disabled {{ background: {c.border}; color: {c.muted}; }}
QPlainTextEdit#composer, QLineEdit {{ background: {c.base}; color: {c.text}; border: 1px solid {c.border};
    border-radius: 10px; padding: 6px 8px; selection-background-color: {c.accent}; }}
QPlainTextEdit#composer:focus, QLineEdit:focus {{ border: 1px solid {c.accent}; }}
QListWidget {{ background: {c.window}; border: none; outline: none; }}
QListWidget::item {{ padding: 7px 8px; border-radius: 8px; color: {c.text}; }}
QListWidget::item:hover {{ background: {c.hover}; }}
QListWidget::item:selected {{ background: {c.selection}; color: {c.text}; }}
QSplitter::handle {{ background: {c.border}; }}
QSplitter::handle:horizontal {{ width: 1px; }}
QLabel#banner {{ background: {c.banner}; color: {c.text}; border-radius: 8px; padding: 8px 12px; }}
QStatusBar, QStatusBar QLabel {{ color: {c.muted}; }}
QScrollBar:vertical {{ background: transparent; width: 10px; margin: 0; }}
QScrollBar::handle:vertical {{ background: {c.border}; border-radius: 4px; min-height: 36px; margin: 2px; }}
QScrollBar::add-line:vertical, QScrollBar::sub-line:vertical {{ height: 0; }}
QScrollBar::add-page:vertical, QScrollBar::sub-page:vertical {{ background: transparent; }}
"""


def scheme_name(scheme: Qt.ColorScheme) -> str:
    return "dark" if scheme == Qt.ColorScheme.Dark else "light"


class _Follower(QObject):
    """Lives on the QApplication: remembers the setting and follows the desktop's changes while it says ``system``."""

    def __init__(self, qt: QApplication) -> None:
        super().__init__(qt)
        self.setObjectName(FOLLOWER)
        self.choice, self.name = "system", ""
        qt.styleHints().colorSchemeChanged.connect(self.system_changed)

    def system_changed(self, scheme: Qt.ColorScheme) -> None:
        if self.choice == "system":
            self.show(scheme_name(scheme))

    def show(self, name: str) -> None:
        qt = QApplication.instance()
        if qt.style().name().lower() != "fusion":
            qt.setStyle("Fusion")
        self.name = name
        qt.setPalette(palette(THEMES[name]))
        qt.setStyleSheet(style_sheet(THEMES[name]))


def _follower() -> _Follower:
    qt = QApplication.instance()
    return qt.findChild(_Follower, FOLLOWER) or _Follower(qt)


def apply_theme(choice: str) -> str:
    """Show the theme the ``theme`` setting ``choice`` (system, light, dark) means now; returns light or dark.
    Also sets the application font's families (size and the rest stay)."""
    qt = QApplication.instance()
    font = qt.font()
    if font.families() != SANS:
        font.setFamilies(SANS)
        qt.setFont(font)
    follower = _follower()
    follower.choice = choice
    follower.show(scheme_name(qt.styleHints().colorScheme()) if choice == "system" else choice)
    return follower.name


def colors() -> Colors:
    """The colours on screen (light before any theme was applied)."""
    qt = QApplication.instance()
    follower = qt.findChild(_Follower, FOLLOWER) if qt is not None else None
    return THEMES[follower.name if follower is not None and follower.name else "light"]


def app_icon() -> QIcon:
    """The window icon, from the PNG renders (no SVG plugin needed at run time)."""
    icon = QIcon()
    for size in ICON_SIZES:
        icon.addFile(str(ASSETS / f"streamchat-{size}.png"))
    return icon
