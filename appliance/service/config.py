"""What a server is started with, and the checks made before it binds: loopback unless a token guards it."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import StreamChatError
from appliance.folders import read_small_text

TOKEN_ENV = "STREAMCHAT_TOKEN"
MIN_TOKEN_CHARS = 16
TOKEN_FILE_CAP = 4096
WEB_ORIGIN = re.compile(r"https?://[^/\s?#@]+|null")  # scheme://host[:port] as browsers send it, or a file page's


@dataclass(frozen=True)
class ServiceConfig:
    """``queue``: requests that may wait for a free replica (more get 429); ``token``: the bearer token clients must
    send (None: none needed, allowed on loopback only); ``client_connections``: WebSocket connections plus HTTP
    answers in flight that one remote address may hold at once; ``allow_origins``: web origins whose pages may use
    the server (open /ws/chat, and read HTTP answers: CORS, which is off while it is empty); ``log_messages``: one
    line per request with its text on stderr (off: no message text is written anywhere); ``host``: a name or an
    address, an IPv6 one also in the brackets URLs put it in (``[::1]``), which are dropped here, once."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    queue: int = 16
    token: str | None = None
    max_body_bytes: int = 1 << 20  # an HTTP request body or a WebSocket frame
    max_message_chars: int = 16000  # one message's text (the demo's context is 512 tokens, ChatGLM-6B's 2048)
    retry_after_s: int = 1  # the hint sent with a full queue's 429 / error frame
    allow_origins: tuple[str, ...] = ()  # web origins (``https://kiosk.example``), ``null`` for a page from a file
    client_connections: int = 32
    log_messages: bool = False
    devices: tuple[int, ...] = ()  # accelerator ids, one replica in a worker process each (else ``replicas`` in process)

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", self.host.strip().removeprefix("[").removesuffix("]"))

    @property
    def url(self) -> str:
        """Where clients reach the server: an IPv6 address goes in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def size(self) -> int:
        """How many replicas answer at once."""
        return len(self.devices) or self.replicas


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); any other name may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Path | None) -> str | None:
    """The bearer token from ``path`` (its first line), else from $STREAMCHAT_TOKEN, else None."""
    if path is not None:
        text = read_small_text(path, TOKEN_FILE_CAP, "token file")
        token, source = (text.splitlines() or [""])[0].strip(), f"token file {path}"
    elif os.environ.get(TOKEN_ENV) is not None:
        token, source = os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise StreamChatError(f"the token in {source} has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                              "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def parse_devices(text: str | None, replicas: int | None) -> tuple[int, ...]:
    """``--devices 0,1,2,3`` as device ids (none without the flag); one line for a bad list or for ``--replicas``
    beside it (each decides how many replicas there are)."""
    if text is None:
        return ()
    if replicas is not None:
        raise StreamChatError("give --devices (one replica per device, each in a worker process) or --replicas (that "
                              "many in this process), not both")
    parts = text.split(",")
    if not all(p.strip().isascii() and p.strip().isdigit() and len(p.strip()) <= 6 for p in parts):
        raise StreamChatError(f"--devices takes device ids separated by commas, such as 0,1,2,3; not {text[:40]!r}")
    devices = tuple(int(p) for p in parts)
    if len(set(devices)) != len(devices):
        raise StreamChatError(f"--devices names a device twice ({text[:40]}): one replica per device")
    return devices


def check_config(config: ServiceConfig) -> None:
    """Refuse, in one line, a configuration that must not start: an open bind without a token, bad numbers or
    origins."""
    if not is_loopback(config.host) and config.token is None:
        raise StreamChatError(f"--host {config.host} is not a loopback address: give --token-file FILE or set "
                              f"${TOKEN_ENV} so that clients must authenticate")
    if not 1 <= config.replicas <= 64:
        raise StreamChatError(f"--replicas must be between 1 and 64, got {config.replicas}")
    if len(config.devices) > 64:
        raise StreamChatError(f"--devices names {len(config.devices)} devices; at most 64")
    if not 0 <= config.queue <= 100000:
        raise StreamChatError(f"--queue must be between 0 and 100000, got {config.queue}")
    for origin in config.allow_origins:
        if not WEB_ORIGIN.fullmatch(origin.rstrip("/").lower()):
            raise StreamChatError(f"--allow-origin {origin!r} is not a web origin: give scheme://host[:port] (e.g. "
                                  "https://kiosk.example:8443) or null, one per flag; '*' is not accepted")
    if not 1 <= config.client_connections <= 100000:
        raise StreamChatError(f"--client-connections must be between 1 and 100000, got {config.client_connections}")
    if not 1 <= config.port <= 65535:
        raise StreamChatError(f"--port must be between 1 and 65535, got {config.port}")
