"""The opt-in request log (``streamchat serve --log-messages``): one line per answer request, with its text.

Off by default: the server then writes no message text anywhere (it keeps no access log; errors name the problem
only). When on, each request that starts an answer is one line on stderr, written as it arrives, so a request that is
queued, refused or cut short is still in the log:
``2024-05-01T12:00:00Z request endpoint=websocket conversation=12 chars=17 text="StreamChat 是什么？"``
The text is JSON-escaped (line separators too), so a message with line breaks or control characters stays one line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

# Line breaks that JSON leaves as they are but str.splitlines (and some viewers) break on.
_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def request_line(endpoint: str, conversation_id: int | None, text: str) -> str:
    """One log line (no newline) for a request to ``endpoint`` with ``text``."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conversation = "new" if conversation_id is None else str(conversation_id)
    return (f"{when} request endpoint={endpoint} conversation={conversation} chars={len(text)} "
            f"text={json.dumps(text, ensure_ascii=False).translate(_BREAKS)}")


class RequestLog:
    """Writes request lines to ``stream`` (stderr by default), one ``write`` and flush each."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def __call__(self, endpoint: str, conversation_id: int | None, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(request_line(endpoint, conversation_id, text) + "\n")
        stream.flush()
