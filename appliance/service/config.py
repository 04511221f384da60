"""What a server is started with, and the checks made before it binds: loopback unless a token guards it."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import StreamChatError
from appliance.folders import read_small_text

TOKEN_ENV = "STREAMCHAT_TOKEN"
MIN_TOKEN_CHARS = 16
TOKEN_FILE_CAP = 4096


@dataclass(frozen=True)
class ServiceConfig:
    """``queue``: requests that may wait for a free replica (more get 429); ``token``: the bearer token clients must
    send (None: none needed, allowed on loopback only)."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    queue: int = 16
    token: str | None = None
    max_body_bytes: int = 1 << 20  # an HTTP request body or a WebSocket frame
    max_message_chars: int = 16000  # one message's text (the demo's context is 512 tokens, ChatGLM-6B's 2048)
    retry_after_s: int = 1  # the hint sent with a full queue's 429 / error frame
    allow_origins: tuple[str, ...] = ()  # web origins (``https://kiosk.example``) whose pages may open /ws/chat


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); any other name may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
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


def check_config(config: ServiceConfig) -> None:
    """Refuse, in one line, a configuration that must not start: an open bind without a token, or bad numbers."""
    if not is_loopback(config.host) and config.token is None:
        raise StreamChatError(f"--host {config.host} is not a loopback address: give --token-file FILE or set "
                              f"${TOKEN_ENV} so that clients must authenticate")
    if not 1 <= config.replicas <= 64:
        raise StreamChatError(f"--replicas must be between 1 and 64, got {config.replicas}")
    if not 0 <= config.queue <= 100000:
        raise StreamChatError(f"--queue must be between 0 and 100000, got {config.queue}")
    if not 1 <= config.port <= 65535:
        raise StreamChatError(f"--port must be between 1 and 65535, got {config.port}")
