"""Keeps web pages of other sites out of the loopback server, and one client from taking every connection.

A page in the user's browser can reach ``127.0.0.1``: by a cross-site WebSocket (browsers send its ``Origin`` and
apply no same-origin rule to WebSockets), or by DNS rebinding (its own host name resolving to 127.0.0.1, sent as
``Host``). So a WebSocket handshake whose ``Origin`` is not the server's own (or one of ``allow_origins``) is refused,
and a server without a token, which nothing else guards, answers only requests whose ``Host`` is the bound address or
a loopback name. (HTTP POSTs must be ``application/json``, which a page can send cross-site only after a CORS preflight,
which the server grants to ``allow_origins`` only: the same list, so one flag names the pages that may use it.)

Each remote address may hold ``client_connections`` WebSocket connections plus HTTP POSTs (every POST starts an
answer) at once; one more is refused with a reason and everyone else is served as before. Behind a reverse proxy every
client has the proxy's address, so the limit then applies to all of them together: set it for that, or at the proxy.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.service.config import ServiceConfig
from appliance.service.metrics import Metrics
from appliance.service.openai_format import error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
TRY_AGAIN_LATER = 1013  # the WebSocket close code for a connection refused by the limit


def web_origins(config: ServiceConfig) -> list[str]:
    """``allow_origins`` as browsers send them in ``Origin``: lower case, no trailing slash."""
    return [o.rstrip("/").lower() for o in config.allow_origins]


def cors_options(config: ServiceConfig) -> dict:
    """Starlette's ``CORSMiddleware`` settings for ``allow_origins``' pages: GET and POST with a bearer token and a
    JSON body, no cookies (the server uses none). Without ``allow_origins`` the middleware is not added at all."""
    return {"allow_origins": web_origins(config), "allow_methods": ["GET", "POST"],
            "allow_headers": ["Authorization", "Content-Type"], "max_age": 600}


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
        self.hosts = None if config.token is not None else {config.host.lower(), *LOOPBACK_NAMES}
        self.origins = set(web_origins(config))

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


class ClientLimit:
    """ASGI middleware: at most ``client_connections`` WebSocket connections plus HTTP POSTs in flight per remote
    address; one more gets close code 1013 with the reason (WebSocket) or 429 with the message (HTTP)."""

    def __init__(self, app: ASGIApp, config: ServiceConfig, metrics: Metrics) -> None:
        self.app, self.metrics, self.limit = app, metrics, config.client_connections
        self.open: dict[str, int] = {}  # remote address -> connections and POSTs in flight (on the event loop only)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        counted = scope["type"] == "websocket" or (scope["type"] == "http" and scope["method"] == "POST")
        if not counted:
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown",))[0]
        if self.open.get(client, 0) >= self.limit:
            await self._refuse(scope, receive, send)
            return
        self.open[client] = self.open.get(client, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open[client] -= 1
            if not self.open[client]:
                del self.open[client]

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.error("too_many_connections")
        problem = (f"too many connections from this address ({self.limit} open or answering): close one or wait for "
                   "an answer to end")
        if scope["type"] == "websocket":  # accepted, then closed: the client sees the code and the reason
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": TRY_AGAIN_LATER, "reason": problem[:120]})
            return
        body = json.dumps(error_body(problem, "rate_limit_error", "too_many_connections")).encode()
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})
