"""Markdown of a streamed answer, block by block: a complete block is parsed once, never again as the answer grows.

``BlockStream`` cuts the text into top-level blocks as their lines arrive: fenced code blocks (``` or ~~~), and runs of
text that end where a blank line is followed by a line starting a new paragraph (not a list item or an indented
continuation, so a loose list stays one block and keeps its numbering). ``append_markdown`` renders one text block into
a document after what is there; code blocks are the message view's (ui/messages.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PySide6.QtGui import QColor, QTextBlockFormat, QTextCharFormat, QTextCursor, QTextDocument, QTextDocumentFragment

FENCE = re.compile(r" {0,3}(`{3,}|~{3,})(.*)")
CONTINUES = re.compile(r"(?: {2,}|\t|[-*+] |\d{1,9}[.)] )")  # continues a block across a blank line: lists, indents
# Noncharacters (never meaningful in text, not used by Qt inside documents) that stand in for characters Qt's Markdown
# would interpret: "&" (entities are decoded even without HTML) and "!" (images, loaded from any local path).
STAND_INS = {"&": "\ufdef", "!": "\ufdee"}
MONOSPACE = ["JetBrains Mono", "Cascadia Mono", "Source Code Pro", "DejaVu Sans Mono", "Noto Sans Mono CJK SC",
             "Menlo", "Consolas", "monospace"]  # Latin first, then a monospaced CJK face for Chinese in code
INLINE_CODE_BACKGROUND = QColor(127, 127, 127, 46)  # a grey that reads on light and dark backgrounds alike


@dataclass(frozen=True)
class Block:
    kind: str  # "text" (its Markdown) or "code" (its lines, without the fences)
    source: str
    language: str = ""


def _fence(line: str) -> tuple[str, str] | None:
    """(fence, info) when ``line`` opens a fenced code block (a backtick fence's info has no backtick)."""
    match = FENCE.fullmatch(line)
    if match is None or (match.group(1)[0] == "`" and "`" in match.group(2)):
        return None
    return match.group(1), match.group(2).strip()


class BlockStream:
    """Complete blocks of a text that arrives in pieces, and what is still open (shown as it is until complete)."""

    def __init__(self) -> None:
        self.lines: list[str] = []  # complete lines of the open block
        self.code: tuple[str, str] | None = None  # (fence, language) inside a fenced block
        self.partial = ""  # the line being written
        self.blank = False  # the open text block ended with a blank line

    def feed(self, text: str) -> list[Block]:
        """The blocks ``text`` completes (the cost is that of ``text`` and the line it continues)."""
        *lines, self.partial = (self.partial + text).split("\n")
        return [block for line in lines for block in self._line(line)]

    def finish(self) -> list[Block]:
        """The rest as blocks: an unclosed fence is code to the end, as in GitHub's Markdown."""
        done = self.feed("\n") if self.partial else []
        if self.code is not None:
            done.append(Block("code", "\n".join(self.lines), self.code[1]))
            self.lines, self.code = [], None
        return done + self._close_text()

    def pending(self) -> tuple[str, str, str]:
        """(kind, language, text) of the open block as it stands; a partial line that may become a fence is left out
        until it is complete."""
        partial = [] if self.partial.lstrip(" ")[:3] in ("```", "~~~") else [self.partial]
        if self.code is not None:
            return "code", self.code[1], "\n".join(self.lines + partial)
        return "text", "", "\n".join(self.lines + partial).lstrip("\n")

    def _line(self, line: str) -> list[Block]:
        if self.code is not None:
            fence = FENCE.fullmatch(line)
            if fence and fence.group(1)[0] == self.code[0][0] and len(fence.group(1)) >= len(self.code[0]) \
                    and not fence.group(2).strip():
                block = Block("code", "\n".join(self.lines), self.code[1])
                self.lines, self.code = [], None
                return [block]
            self.lines.append(line)
            return []
        if (opened := _fence(line)) is not None:
            done = self._close_text()
            self.code = (opened[0], opened[1].split()[0] if opened[1] else "")
            return done
        if not line.strip():
            self.blank = bool(self.lines)
            if self.lines:
                self.lines.append(line)
            return []
        done = self._close_text() if self.blank and not CONTINUES.match(line) else []
        self.blank = False
        self.lines.append(line)
        return done

    def _close_text(self) -> list[Block]:
        text = "\n".join(self.lines).strip("\n")
        self.lines, self.blank = [], False
        return [Block("text", text)] if text.strip() else []


def parse_markdown(text: str) -> QTextDocument:
    """``text`` parsed as GitHub Markdown where every character shows as itself.

    The safety filter checks the text, so the rendering may not turn it into other characters: raw HTML (tags,
    comments) is not interpreted (``MarkdownNoHTML``), entities such as ``&#28856;`` are not decoded and images are
    not loaded. Qt decodes entities even without HTML, so each ``&`` (and each ``!``, which starts an image) goes
    through the parser as a stand-in character and is put back after. Markdown still drops some characters (an empty
    link ``bo[](x)mb`` shows as one word): ``MessageView`` checks what is shown, not only what was filtered.
    Inline code gets the monospaced fonts and a tinted background.
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
    code = QTextCharFormat()
    code.setFontFamilies(MONOSPACE)
    code.setBackground(INLINE_CODE_BACKGROUND)
    block = doc.begin()
    while block.isValid():
        fragments = block.begin()
        while not fragments.atEnd():
            fragment = fragments.fragment()
            if fragment.charFormat().fontFixedPitch():
                cursor = QTextCursor(doc)
                cursor.setPosition(fragment.position())
                cursor.setPosition(fragment.position() + fragment.length(), QTextCursor.KeepAnchor)
                cursor.mergeCharFormat(code)
            fragments += 1
        block = block.next()
    return doc


def append_markdown(target: QTextDocument, text: str) -> None:
    """Render ``text`` (one block of a ``BlockStream``) at the end of ``target``, in blocks of its own.

    Qt inserts a fragment's first block into the block at the cursor without that block's format (a heading becomes a
    paragraph, a list's first item leaves the list): so the fragment gets an empty first block, which merges into the
    end of what is there, and the first real block keeps its format and list.
    """
    doc = parse_markdown(text)
    cursor = QTextCursor(target)
    cursor.movePosition(QTextCursor.End)
    if not target.isEmpty():
        first = doc.begin()
        start = QTextCursor(doc)
        start.insertBlock(first.blockFormat(), first.charFormat())  # the content moves on into a block of its own
        empty, content = doc.begin(), doc.begin().next()
        if empty.textList() is not None:
            listed = empty.textList()
            listed.remove(empty)
            listed.add(content)
        QTextCursor(empty).setBlockFormat(QTextBlockFormat())
    cursor.insertFragment(QTextDocumentFragment(doc))
