"""Keeps web pages of other sites out of the loopback server.

A page in the user's browser can reach ``127.0.0.1``: by a cross-site WebSocket (browsers send its ``Origin`` and
apply no same-origin rule to WebSockets), or by DNS rebinding (its own host name resolving to 127.0.0.1, sent as
``Host``). So a WebSocket handshake whose ``Origin`` is not the server's own (or one of ``allow_origins``) is refused,
and a server without a token, which nothing else guards, answers only requests whose ``Host`` is the bound address or
a loopback name. (HTTP POSTs must be ``application/json``, which a page can send cross-site only after a CORS preflight,
which this server never grants.)
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.service.config import ServiceConfig
from appliance.service.metrics import Metrics
from appliance.service.openai_format import error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str:
    """A Host header without its port: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class SiteGuard:
    """ASGI middleware: refuses foreign ``Host`` headers (tokenless server) and foreign WebSocket origins."""

    def __init__(self, app: ASGIApp, config: ServiceConfig, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.hosts = None if config.token is not None else {config.host.strip("[]").lower(), *LOOPBACK_NAMES}
        self.origins = {o.rstrip("/").lower() for o in config.allow_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        problem = None
        if self.hosts is not None and host_name(host) not in self.hosts:
            problem = f"the Host header {json.dumps(host)[:80]} is not this server's: use http://127.0.0.1 or localhost"
        elif scope["type"] == "websocket" and "origin" in headers:
            origin = headers["origin"].rstrip("/").lower()
            if origin not in self.origins and origin not in (f"http://{host.lower()}", f"https://{host.lower()}"):
                problem = f"WebSocket connections from the web origin {json.dumps(headers['origin'])[:80]} are refused"
        if problem is None:
            await self.app(scope, receive, send)
            return
        self.metrics.error("forbidden")
        if scope["type"] == "websocket":  # closing before accepting: the client's handshake gets HTTP 403
            await send({"type": "websocket.close", "code": 1008, "reason": problem[:120]})
            return
        body = json.dumps(error_body(problem, code="forbidden")).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
