"""Connections per client and CORS on the real server: one remote address past ``--client-connections`` gets a clear
refusal (WebSocket close 1013 with the reason, HTTP 429 with the message) while another address, and its own open
connections, are served; CORS headers only for ``--allow-origin`` origins, none without the flag."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
import websockets

from tests import test_service
from tests.test_service import JSON, PROMPT, Server, _answer, _env

server = test_service.server  # the fixture: real servers on free ports, stopped after the test

OTHER_CLIENT = "127.0.0.2"  # another loopback address: a second client as far as the server can tell
KIOSK = "https://kiosk.example"


def _completion(srv: Server, local_address: str | None = None) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=local_address), timeout=60) as client:
        return client.post(srv.url + "/v1/chat/completions", headers=JSON,
                           json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8})


def _errors(srv: Server) -> float:
    line = next(line for line in httpx.get(srv.url + "/metrics").text.splitlines()
                if line.startswith('streamchat_errors_total{kind="too_many_connections"}'))
    return float(line.split()[-1])


def test_one_client_past_its_connections_is_refused_while_others_are_served(server):
    srv = server("--client-connections", "2")

    async def scenario():
        async with websockets.connect(srv.ws_url) as first, websockets.connect(srv.ws_url) as second:
            with pytest.raises(websockets.ConnectionClosedError) as refused:
                async with websockets.connect(srv.ws_url) as third:
                    await third.recv()
            http = await asyncio.to_thread(_completion, srv)
            other = await asyncio.to_thread(_completion, srv, OTHER_CLIENT)
            async with websockets.connect(srv.ws_url, local_addr=(OTHER_CLIENT, 0)) as elsewhere:
                other_ws = await _answer(elsewhere, {"text": PROMPT, "max_new_tokens": 8})
            still = await _answer(first, {"text": PROMPT, "max_new_tokens": 8})  # its own open connections work
            await second.close()
        async with websockets.connect(srv.ws_url) as again:  # a place is free again
            after = await _answer(again, {"text": PROMPT, "max_new_tokens": 8})
        return refused.value, http, other, other_ws, still, after

    refused, http, other, other_ws, still, after = asyncio.run(scenario())
    assert refused.rcvd.code == 1013
    assert refused.rcvd.reason == ("too many connections from this address (2 open or answering): close one or wait "
                                   "for an answer to end")
    assert http.status_code == 429 and http.headers["retry-after"] == "1"
    assert http.json()["error"]["code"] == "too_many_connections"
    assert http.json()["error"]["message"].startswith("too many connections from this address (2 open")
    assert other.status_code == 200 and other.json()["choices"][0]["message"]["content"]
    for _, done in (other_ws, still, after):
        assert done["type"] == "done", done
    assert _errors(srv) == 2


def test_an_http_answer_in_flight_counts_against_the_client(server):
    """A POST whose body is still arriving holds one of the client's places until it has been answered."""
    srv = server("--client-connections", "1")
    body = json.dumps({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body[:10])

        async def refused_meanwhile():
            with pytest.raises(websockets.ConnectionClosedError) as refused:
                async with websockets.connect(srv.ws_url) as ws:
                    await ws.recv()
            return refused.value

        assert asyncio.run(refused_meanwhile()).rcvd.code == 1013
        assert _completion(srv).status_code == 429
        raw.sendall(body[10:])
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and json.loads(payload)["choices"][0]["message"]["content"]

    async def served_after():
        async with websockets.connect(srv.ws_url) as ws:
            return await _answer(ws, {"text": PROMPT, "max_new_tokens": 8})

    assert asyncio.run(served_after())[1]["type"] == "done"


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


def test_no_cors_headers_without_allow_origin(server):
    srv = server()
    preflight = httpx.options(srv.url + "/v1/chat/completions", headers={"Origin": KIOSK, **PREFLIGHT})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    models = httpx.get(srv.url + "/v1/models", headers={"Origin": KIOSK})
    assert models.status_code == 200 and not [h for h in models.headers if h.startswith("access-control-")]


def test_cors_for_allowed_origins_only(server):
    srv = server("--allow-origin", KIOSK + "/")
    preflight = httpx.options(srv.url + "/v1/chat/completions", headers={"Origin": KIOSK, **PREFLIGHT})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == KIOSK
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers
    answer = httpx.post(srv.url + "/v1/chat/completions", headers={"Origin": KIOSK, **JSON}, timeout=60,
                        json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == KIOSK
    foreign = httpx.options(srv.url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert foreign.status_code == 400 and "access-control-allow-origin" not in foreign.headers
    models = httpx.get(srv.url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in models.headers

    async def sockets():  # the same flag lets the kiosk's pages, and only them, open /ws/chat
        async with websockets.connect(srv.ws_url, origin=KIOSK) as ws:
            kiosk = await _answer(ws, {"text": PROMPT, "max_new_tokens": 8})
        with pytest.raises(websockets.InvalidStatus) as foreign_ws:
            async with websockets.connect(srv.ws_url, origin="https://evil.example"):
                pass
        return kiosk, foreign_ws.value

    kiosk, foreign_ws = asyncio.run(sockets())
    assert kiosk[1]["type"] == "done" and foreign_ws.response.status_code == 403


@pytest.mark.parametrize(("args", "message"), [
    (["--allow-origin", "*"], "--allow-origin '*' is not a web origin: give scheme://host[:port]"),
    (["--allow-origin", "https://kiosk.example/app"], "--allow-origin 'https://kiosk.example/app' is not a web origin"),
    (["--client-connections", "0"], "--client-connections must be between 1 and 100000, got 0"),
])
def test_bad_limit_or_origin_is_one_line(tmp_path, args, message):
    run = subprocess.run([sys.executable, "-m", "streamchat", "serve", "--demo", *args], env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_clients_that_leave_midway_give_back_their_places_and_log_no_traceback(server):
    """Many clients that drop mid-body, mid-handshake or mid-answer: each place is given back (two fresh connections
    are served at a limit of 2), and a body cut short is an ordinary event, not a traceback in the server's log."""
    srv = server("--client-connections", "2")
    cut = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: 1000\r\n\r\n{\"messages\": [")

    async def when_free(attempt):
        """``attempt()``, again while the server refuses with 1013: a place comes back once the server has noticed a
        drop and ended that connection's answer, which takes a moment on a loaded machine; a place never given back
        (a leak) still refuses at the deadline."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return await attempt()
            except websockets.ConnectionClosedError as exc:
                if exc.rcvd is None or exc.rcvd.code != 1013 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def drop(frame: dict | None) -> None:
        async def answering():
            ws = await websockets.connect(srv.ws_url)
            if frame is not None:
                await ws.send(json.dumps(frame))
                await ws.recv()
            return ws

        (await when_free(answering)).transport.abort()

    async def two_served():
        async with websockets.connect(srv.ws_url) as a, websockets.connect(srv.ws_url) as b:
            return [await _answer(ws, {"text": PROMPT, "max_new_tokens": 8}) for ws in (a, b)]

    async def scenario():
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", srv.port)) as conn:
                conn.sendall(cut)
            await drop(None)
            await drop({"text": PROMPT, "max_new_tokens": 200})
        return await when_free(two_served)

    for _, done in asyncio.run(scenario()):
        assert done["type"] == "done", done
    err = srv.stop()
    assert "Traceback" not in err and "ClientDisconnect" not in err, err[-2000:]
