"""The chat transcript: one widget per message, so a new token touches only the message being written."""

from __future__ import annotations

import re
from collections.abc import Callable

from PySide6.QtCore import QCoreApplication, Qt, QTimer, Signal
from PySide6.QtGui import QGuiApplication, QTextDocument, QTextDocumentFragment
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QScrollArea, QVBoxLayout, QWidget

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)
# Noncharacters (never meaningful in text, not used by Qt inside documents) that stand in for characters Qt's Markdown
# would interpret: "&" (entities are decoded even without HTML) and "!" (images, loaded from any local path).
STAND_INS = {"&": "\ufdef", "!": "\ufdee"}


def t(text: str) -> str:
    return QCoreApplication.translate("StreamChat", text)


def markdown_html(text: str) -> str:
    """HTML showing ``text`` rendered as Markdown, where every character of the text is shown as itself.

    The safety filter checks the text, so the rendering may not turn it into other characters: raw HTML (tags,
    comments) is not interpreted (``MarkdownNoHTML``), entities such as ``&#28856;`` are not decoded and images are
    not loaded. Qt decodes entities even without HTML, so each ``&`` (and each ``!``, which starts an image) goes
    through the parser as a stand-in character and is put back after. Markdown still drops some characters (an empty
    link ``bo[](x)mb`` shows as one word): ``MessageView`` checks what is shown, not only what was filtered.
    """
    doc = QTextDocument()
    source = text
    for char, stand_in in STAND_INS.items():
        source = source.replace(stand_in, "\ufffd").replace(char, stand_in)
    doc.setMarkdown(source, QTextDocument.MarkdownDialectGitHub | QTextDocument.MarkdownNoHTML)
    for char, stand_in in STAND_INS.items():
        cursor = doc.find(stand_in)
        while not cursor.isNull():
            cursor.insertText(char, cursor.charFormat())
            cursor = doc.find(stand_in, cursor)
    return QTextDocumentFragment(doc).toHtml()  # a fragment: no fixed font, the label's own font applies


class MessageView(QFrame):
    """A user or assistant message: plain text while streaming, Markdown once complete, copy buttons for code."""

    edit_requested = Signal(int, str)  # message id, text

    def __init__(self, role: str, text: str = "", message_id: int | None = None, editable: bool = True,
                 allowed: Callable[[str], bool] = lambda text: True) -> None:
        """``allowed``: the safety filter's verdict on a text; rendered Markdown that it refuses while the text itself
        passes is shown as plain text instead."""
        super().__init__()
        self.role, self.text, self.message_id, self.allowed = role, text, message_id, allowed
        self.setObjectName("user" if role == "user" else "assistant")
        self.setFrameShape(QFrame.StyledPanel)
        layout = QVBoxLayout(self)
        header = QHBoxLayout()
        header.addWidget(QLabel(f"<b>{t('You') if role == 'user' else t('StreamChat')}</b>"))
        header.addStretch(1)
        self.buttons = header
        layout.addLayout(header)
        self.body = QLabel()
        self.body.setWordWrap(True)
        self.body.setTextInteractionFlags(Qt.TextSelectableByMouse | Qt.LinksAccessibleByMouse)
        layout.addWidget(self.body)
        self.code_row = QHBoxLayout()
        layout.addLayout(self.code_row)
        self._add_button(t("Copy"), lambda: QGuiApplication.clipboard().setText(self.text))
        if role == "user" and editable:
            self._add_button(t("Edit"), lambda: self.edit_requested.emit(self.message_id or -1, self.text))
        if text:
            self.finish()

    def _add_button(self, label: str, action) -> QPushButton:
        button = QPushButton(label)
        button.setFlat(True)
        button.clicked.connect(action)
        self.buttons.addWidget(button)
        return button

    def append(self, delta: str) -> None:
        """Streaming: plain text, no Markdown parse per token."""
        self.text += delta
        self.body.setTextFormat(Qt.PlainText)
        self.body.setText(self.text)

    def finish(self, note: str = "") -> None:
        """Render Markdown once and offer a copy button per code block."""
        source = self.text + (f"\n\n*{note}*" if note else "")
        html = markdown_html(source)
        if self.allowed(QTextDocumentFragment.fromHtml(html).toPlainText()) or not self.allowed(source):
            self.body.setTextFormat(Qt.RichText)
            self.body.setText(html)
        else:  # the rendering joined text into a word the filter refuses: show the characters as they came
            self.body.setTextFormat(Qt.PlainText)
            self.body.setText(source)
        for i, code in enumerate(CODE_BLOCK.findall(self.text), 1):
            button = QPushButton(f"{t('Copy code')} {i}")
            button.clicked.connect(lambda _=False, c=code: QGuiApplication.clipboard().setText(c))
            self.code_row.addWidget(button)
        self.code_row.addStretch(1)


class Transcript(QScrollArea):
    """A scrolling column of MessageViews that follows the newest text while the user is at the bottom."""

    def __init__(self) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        self.inner = QWidget()
        self.column = QVBoxLayout(self.inner)
        self.column.addStretch(1)
        self.setWidget(self.inner)
        self.views: list[MessageView] = []
        self._scroller = QTimer(self)  # a child: it dies with the transcript, so it never fires into a deleted one
        self._scroller.setSingleShot(True)
        self._scroller.setInterval(0)
        self._scroller.timeout.connect(self._scroll_to_end)

    def add(self, view: MessageView) -> MessageView:
        self.column.insertWidget(self.column.count() - 1, view)
        self.views.append(view)
        self.follow()
        return view

    def clear(self) -> None:
        self.remove(self.views)

    def remove_from(self, message_id: int) -> None:
        """Take away the stored message ``message_id`` and every message shown after it (edit, regenerate)."""
        first = next((i for i, view in enumerate(self.views) if (view.message_id or 0) >= message_id), len(self.views))
        self.remove(self.views[first:])

    def remove(self, views: list[MessageView]) -> None:
        """Hide, detach and delete ``views``. Hidden first: a view taken out of the transcript is a top-level widget
        until it is deleted, and the show its layout queued for it when it was added would otherwise open it as a
        window of its own ("StreamChat", one per message, keeping the app running). Detached, so that its deletion
        never meets the window's: the window may be deleted (by Python) while Qt deletes the view."""
        for view in list(views):
            view.hide()
            view.setParent(None)
            view.deleteLater()
            self.views.remove(view)

    def follow(self) -> None:
        bar = self.verticalScrollBar()
        if bar.value() >= bar.maximum() - 40:
            self._scroller.start()  # after the layout has grown

    def _scroll_to_end(self) -> None:
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())
