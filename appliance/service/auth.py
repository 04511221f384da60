"""The bearer token check, in constant time, for HTTP requests and WebSocket handshakes.

HTTP clients send ``Authorization: Bearer TOKEN``. A WebSocket client sends the same header, or ``?token=TOKEN`` in
the URL for browsers, which cannot set headers on a WebSocket (the server keeps no access log, so the URL is not
written anywhere by it; a proxy in front may log it).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def allowed(expected: str | None, headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> bool:
    """True when no token is configured, or the request carries it (header first, then ``?token=``)."""
    if expected is None:
        return True
    given = bearer(headers.get("authorization"))
    if given is None and query is not None:
        given = query.get("token")
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
