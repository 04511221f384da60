"""Talk to a running ``streamchat serve`` as clients do (installers/test.sh runs it against the installed .deb's
server): wait for /ready, one OpenAI chat completion, one WebSocket turn. Exit 0 when both answered, else 1 with why.

Usage: python installers/serve_check.py URL   (http://127.0.0.1:PORT, a server without a token)
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import websockets

PROMPT = "StreamChat 是什么？"


def main(url: str) -> int:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            print("serve_check: the server did not become ready in 120 s")
            return 1
        time.sleep(0.2)
    reply = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": PROMPT}], "temperature": 0})
    completion = reply.json()["choices"][0]["message"]["content"] if reply.status_code == 200 else ""

    async def turn() -> tuple[str, dict]:
        async with websockets.connect(url.replace("http", "ws", 1) + "/ws/chat") as ws:
            await ws.send(json.dumps({"text": PROMPT, "greedy": True}))
            deltas = []
            while (frame := json.loads(await ws.recv()))["type"] == "delta":
                deltas.append(frame["text"])
            return "".join(deltas), frame

    streamed, done = asyncio.run(turn())
    print(f"serve_check: /v1/chat/completions {reply.status_code} {completion[:40]!r}; /ws/chat {done['type']} "
          f"{streamed[:40]!r}")
    return 0 if completion and streamed == completion and done["type"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
