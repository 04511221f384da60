"""The chat transcript: one widget per message, so a new token touches only the message being written.

A message is a bubble (the user's on the right, the assistant's on the left) holding a ``MessageBody``: one read-only
document (select and copy across paragraphs) built block by block as the text streams in (ui/markdown.py). A
complete block is rendered once; the open one is shown as it arrives, its new characters inserted at the end, so a
token costs the same at the start and at the end of a long answer. A fenced code block is its lines in monospace on a
painted box, with a header widget over the box: the language and a Copy code button (the exact code, from the text).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PySide6.QtCore import QCoreApplication, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import (
    QColor,
    QGuiApplication,
    QPainter,
    QPen,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextOption,
)
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from ui.i18n import CONTEXT
from ui.markdown import MONOSPACE, Block, BlockStream, append_markdown
from ui.theme import colors

HEADER, PAD, GAP = 30, 8, 6  # a code block's header height, its inner padding, and its distance to the text around
BOUNDARY = 256  # characters either side of where rendered text meets the open block that are checked as they change
MAX_WIDTH = 880  # of the column of messages


def t(text: str) -> str:
    return QCoreApplication.translate(CONTEXT, text)


@dataclass
class CodeSpan:
    """A code block in a body: its blocks in the document (``last`` None while it is still being written), its code,
    and its header widget."""

    first: int
    last: int | None
    code: str
    header: QWidget


class MessageBody(QTextEdit):
    """A message's rendered text; its height follows its content at the width the bubble gives it."""

    def __init__(self, allowed: Callable[[str], bool]) -> None:
        super().__init__()
        self.setObjectName("messageBody")
        self.setReadOnly(True)
        self.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.setFocusPolicy(Qt.ClickFocus)
        self.setFrameShape(QFrame.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setWordWrapMode(QTextOption.WrapAtWordBoundaryOrAnywhere)
        self.viewport().setAutoFillBackground(False)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.document().setDocumentMargin(0)
        self.allowed, self.source, self.plain = allowed, "", False
        self.stream = BlockStream()
        self.frozen_end = 0  # where the open block's display starts: everything before is final
        self.shown_pending: tuple[str, str, str] | None = None  # (kind, language, text) of the open block on screen
        self.codes: list[CodeSpan] = []
        self.natural_width = 0  # a user message's width without wrapping (its bubble fits it)
        self._placer = QTimer(self)
        self._placer.setSingleShot(True)
        self._placer.setInterval(0)
        self._placer.timeout.connect(self._place_headers)
        self.document().documentLayout().documentSizeChanged.connect(self._fit_height)
        self._fit_height()

    # -- text in -------------------------------------------------------------------------------------------------
    def append(self, delta: str) -> None:
        self.source += delta
        if self.plain:
            self._insert(self._end(), delta)
            return
        done = self.stream.feed(delta)
        if done:
            self._freeze(done)
        self._show_pending()
        if self._end().position() - self.frozen_end <= BOUNDARY:
            self._check_boundary()

    def finish(self, note: str = "") -> None:
        """The rest rendered, what is shown checked as a whole, and ``note`` (stopped, not sent) in italics."""
        if not self.plain:
            self._freeze(self.stream.finish())
            if not self.allowed(self.document().toPlainText()) and self.allowed(self.source):
                self._show_plain()
        if note:
            cursor = self._end()
            if not self.document().isEmpty():
                cursor.insertBlock(QTextBlockFormat(), QTextCharFormat())
            italic = QTextCharFormat()
            italic.setFontItalic(True)
            cursor.insertText(note, italic)

    # -- the document ----------------------------------------------------------------------------------------------
    def _end(self) -> QTextCursor:
        cursor = QTextCursor(self.document())
        cursor.movePosition(QTextCursor.End)
        return cursor

    @staticmethod
    def _insert(cursor: QTextCursor, text: str, block: QTextBlockFormat | None = None,
                char: QTextCharFormat | None = None) -> None:
        """``text`` at ``cursor``, each line break a new block in ``block`` format (plain: the default)."""
        char = char or QTextCharFormat()
        for i, line in enumerate(text.split("\n")):
            if i:
                cursor.insertBlock(block or QTextBlockFormat(), char)
            cursor.insertText(line, char)

    def _freeze(self, blocks: list[Block]) -> None:
        """Replace the open block's display by the rendering of the blocks just completed, and check what is shown
        (rendering may drop characters between words: then the message shows its text as it came)."""
        self._drop_pending()
        for block in blocks:
            if block.kind == "text":
                append_markdown(self.document(), block.source)
            else:
                self._insert_code(block.source, block.language, closed=True)
        self.frozen_end = self._end().position()
        if blocks and not self.allowed(self.document().toPlainText()) and self.allowed(self.source):
            self._show_plain()

    def _show_pending(self) -> None:
        """The open block as it stands: its new characters appended, or drawn again when it changed otherwise."""
        kind, language, text = pending = self.stream.pending()
        shown = self.shown_pending
        if shown and shown[:2] == (kind, language) and text.startswith(shown[2]):
            if len(text) > len(shown[2]):
                self._append_pending(kind, text[len(shown[2]):], starts=not shown[2] and kind == "text")
        else:
            self._drop_pending()
            if kind == "code":
                self._insert_code(text, language, closed=False)
            elif text:
                self._append_pending(kind, text, starts=True)
        self.shown_pending = pending
        if kind == "code":
            self.codes[-1].code = text

    def _append_pending(self, kind: str, text: str, starts: bool) -> None:
        cursor = self._end()
        if kind == "code":
            self._insert(cursor, text, self._code_format(), self._code_chars())
            return
        if starts and not self.document().isEmpty():
            cursor.insertBlock(QTextBlockFormat(), QTextCharFormat())
        self._insert(cursor, text)

    def _drop_pending(self) -> None:
        if self.codes and self.codes[-1].last is None:
            self._remove_header(self.codes.pop())
        cursor = self._end()
        if cursor.position() > self.frozen_end:
            cursor.setPosition(self.frozen_end, QTextCursor.KeepAnchor)
            cursor.removeSelectedText()
            if self.frozen_end == 0:  # the first block stays: without the format the open block gave it
                cursor.setBlockFormat(QTextBlockFormat())
                cursor.setBlockCharFormat(QTextCharFormat())
        self.shown_pending = None

    @staticmethod
    def _code_format(first: bool = False, last: bool = False) -> QTextBlockFormat:
        block = QTextBlockFormat()
        block.setLeftMargin(PAD + 4)
        block.setRightMargin(PAD + 4)
        if first:  # only the margins a line has: merged into a one-line block's format, ``last`` keeps its top
            block.setTopMargin(GAP + HEADER + PAD)
        if last:
            block.setBottomMargin(PAD + GAP)
        return block

    @staticmethod
    def _code_chars() -> QTextCharFormat:
        char = QTextCharFormat()
        char.setFontFamilies(MONOSPACE)
        char.setFontFixedPitch(True)
        return char

    def _insert_code(self, code: str, language: str, closed: bool) -> None:
        cursor = self._end()
        if self.document().isEmpty():
            cursor.setBlockFormat(self._code_format(first=True))
        else:
            cursor.insertBlock(self._code_format(first=True), self._code_chars())
        first = cursor.blockNumber()
        self._insert(cursor, code, self._code_format(), self._code_chars())
        if closed:
            cursor.mergeBlockFormat(self._code_format(last=True))
        span = CodeSpan(first, cursor.blockNumber() if closed else None, code, QWidget(self.viewport()))
        self._build_header(span, language)
        self.codes.append(span)
        self._placer.start()

    def _show_plain(self) -> None:
        """The text as it came, and from now on every delta as it comes."""
        self.plain = True
        for span in self.codes:
            self._remove_header(span)
        self.codes.clear()
        self.document().clear()
        self._insert(self._end(), self.source)

    def _check_boundary(self) -> None:
        """Rendered text meets the open block's characters: check the join while it is within reach of a rule."""
        cursor = self._end()
        cursor.setPosition(max(0, self.frozen_end - BOUNDARY), QTextCursor.KeepAnchor)
        if not self.allowed(cursor.selectedText()) and self.allowed(self.source):
            self._show_plain()

    # -- code block headers and boxes -------------------------------------------------------------------------------
    def _build_header(self, span: CodeSpan, language: str) -> None:
        header = span.header
        header.setObjectName("codeHeader")
        header.setAttribute(Qt.WA_StyledBackground, True)
        row = QHBoxLayout(header)
        row.setContentsMargins(PAD + 4, 0, 4, 0)
        label = QLabel(language)
        label.setObjectName("codeLanguage")
        label.setTextFormat(Qt.PlainText)
        copy = QPushButton(t("Copy code"))
        copy.setObjectName("copyCode")
        copy.setCursor(Qt.PointingHandCursor)
        copy.clicked.connect(lambda: QGuiApplication.clipboard().setText(span.code))
        row.addWidget(label)
        row.addStretch(1)
        row.addWidget(copy)
        header.show()

    @staticmethod
    def _remove_header(span: CodeSpan) -> None:
        span.header.hide()
        span.header.deleteLater()

    def _box(self, span: CodeSpan) -> QRectF:
        """Where a code block's box is, in the viewport (no scrolling: the body is as tall as its document)."""
        doc = self.document()
        first = doc.findBlockByNumber(span.first)
        last = doc.findBlockByNumber(span.last) if span.last is not None else doc.lastBlock()
        top = first.layout().position().y() - PAD - HEADER
        bottom = last.layout().position().y() + last.layout().boundingRect().height() + PAD
        return QRectF(0.5, top + 0.5, self.viewport().width() - 1.0, bottom - top - 1.0)

    def _place_headers(self) -> None:
        for span in self.codes:
            box = self._box(span)
            span.header.setGeometry(int(box.left()) + 1, int(box.top()) + 1, int(box.width()) - 1, HEADER)

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt override
        if self.codes:
            theme = colors()
            painter = QPainter(self.viewport())
            painter.setRenderHint(QPainter.Antialiasing)
            painter.setPen(QPen(QColor(theme.border), 1))
            painter.setBrush(QColor(theme.code))
            for span in self.codes:
                painter.drawRoundedRect(self._box(span), 8, 8)
            painter.end()
        super().paintEvent(event)

    # -- size ------------------------------------------------------------------------------------------------------
    def _fit_height(self) -> None:
        """As tall as the document at the current width, and the box of a code block that ends it: an open block has
        no bottom margin yet, and Qt leaves a closed last block's out of the document's height."""
        last = self.document().blockCount() - 1
        extra = PAD + 2 if self.codes and self.codes[-1].last in (None, last) else 0
        height = int(self.document().size().height() + 0.999) + extra
        if height != self.height() or self.minimumHeight() != height:
            self.setFixedHeight(max(height, 1))
        self._placer.start()

    def measure_natural_width(self) -> None:
        doc = self.document()
        width = doc.textWidth()
        doc.setTextWidth(-1)
        self.natural_width = int(doc.idealWidth() + 2)
        doc.setTextWidth(width)
        self.updateGeometry()

    def sizeHint(self):  # noqa: N802 - Qt override
        hint = super().sizeHint()
        if self.natural_width:
            hint.setWidth(self.natural_width)
        hint.setHeight(self.height())
        return hint

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._placer.start()


class MessageView(QWidget):
    """A user or assistant message: its bubble, who wrote it, and its actions (Copy; Edit for the user's)."""

    edit_requested = Signal(int, str)  # message id, text

    def __init__(self, role: str, text: str = "", message_id: int | None = None, editable: bool = True,
                 allowed: Callable[[str], bool] = lambda text: True) -> None:
        """``allowed``: the safety filter's verdict on a text; rendered Markdown that it refuses while the text itself
        passes is shown as plain text instead."""
        super().__init__()
        self.role, self.text, self.message_id = role, "", message_id
        self.setObjectName("user" if role == "user" else "assistant")
        user = role == "user"
        self.body = MessageBody(allowed)
        if user:
            self.body.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Fixed)
        self.bubble = QFrame()
        self.bubble.setObjectName("bubble")
        self.bubble.setProperty("role", "user" if user else "assistant")
        inside = QVBoxLayout(self.bubble)
        inside.setContentsMargins(14, 10, 14, 10)
        inside.addWidget(self.body)
        speaker = QLabel(t("You") if user else t("StreamChat"))
        speaker.setObjectName("speaker")
        self.buttons = QHBoxLayout()
        self.buttons.setSpacing(2)
        if user:
            self.buttons.addStretch(1)
        column = QVBoxLayout()
        column.setSpacing(3)
        column.addWidget(speaker, 0, Qt.AlignRight if user else Qt.AlignLeft)
        column.addWidget(self.bubble)
        column.addLayout(self.buttons)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 6, 0, 6)
        if user:
            row.addStretch(1)
            row.addLayout(column)
        else:
            row.addLayout(column, 1)
            row.addSpacing(48)
        self._add_button(t("Copy"), lambda: QGuiApplication.clipboard().setText(self.text))
        if user and editable:
            self._add_button(t("Edit"), lambda: self.edit_requested.emit(self.message_id or -1, self.text))
        if not user:
            self.buttons.addStretch(1)
        if text:
            self.append(text)
            self.finish()

    def _add_button(self, label: str, action) -> QPushButton:
        button = QPushButton(label)
        button.setObjectName("messageAction")
        button.setCursor(Qt.PointingHandCursor)
        button.clicked.connect(action)
        self.buttons.addWidget(button)
        return button

    def append(self, delta: str) -> None:
        """Streaming: the delta goes into the open block (see MessageBody)."""
        self.text += delta
        self.body.append(delta)

    def finish(self, note: str = "") -> None:
        """The whole message rendered and checked; a user's bubble then fits its text."""
        self.body.finish(note)
        if self.role == "user":
            self.body.measure_natural_width()

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        if self.role == "user":  # at most three quarters of the row: the bubble wraps beyond
            self.body.setMaximumWidth(max(120, int(self.width() * 0.75) - 28))
        super().resizeEvent(event)


class Transcript(QScrollArea):
    """A scrolling column of MessageViews that follows the newest text while the user is at the bottom (or near it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("transcript")
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.inner = QWidget()
        self.inner.setObjectName("transcriptInner")
        self.column = QVBoxLayout(self.inner)
        self.column.setContentsMargins(20, 12, 20, 12)
        self.column.setSpacing(2)
        self.column.addStretch(1)
        self.setWidget(self.inner)
        self.views: list[MessageView] = []
        # Following is a state, not a look at the bar after each change: a new message or a rendered block can add
        # more height at once than any margin, and the layout grows the range only later. The user's own scrolling
        # (a value change) decides it; a range change while following moves to the new end.
        self.following = True
        bar = self.verticalScrollBar()
        bar.valueChanged.connect(self._on_scrolled)
        bar.rangeChanged.connect(self._on_range)

    def add(self, view: MessageView) -> MessageView:
        self.column.insertWidget(self.column.count() - 1, view)
        self.views.append(view)
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

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        """Messages in a centred column at most MAX_WIDTH wide: lines stay readable in a wide window."""
        side = max(20, (event.size().width() - MAX_WIDTH) // 2)
        self.column.setContentsMargins(side, 12, side, 12)
        super().resizeEvent(event)

    def _on_scrolled(self, value: int) -> None:
        self.following = value >= self.verticalScrollBar().maximum() - 40

    def _on_range(self, _low: int, high: int) -> None:
        if self.following:
            self.verticalScrollBar().setValue(high)
