"""``/ws/chat``: the WebSocket chat. One answer at a time per connection, stored in the app's history.

The client sends a message (JSON or plain text); the server streams ``{"type": "delta", "text": ...}`` frames, then
``{"type": "done", ...}`` or ``{"type": "error", "message": ...}``. ``{"type": "stop"}`` or closing the connection
cancels the answer within one token. A message without ``conversation_id`` continues the connection's conversation
(the first one starts a new conversation).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import WebSocket

from appliance import crash
from appliance.errors import StreamChatError
from appliance.service.answer import Answer, Job, Service
from appliance.service.auth import allowed
from appliance.service.config import ServiceConfig
from appliance.service.options import ChatFrame, RequestError, chat_frame, generation_settings
from appliance.service.pool import QueueFull
from appliance.session import TurnResult

POLICY_VIOLATION = 1008  # the close code for a refused token


class _Gone(Exception):
    """The client closed the connection while the server was sending."""


class ChatConnection:
    def __init__(self, ws: WebSocket, service: Service, config: ServiceConfig) -> None:
        self.ws, self.service, self.config = ws, service, config
        self.conversation_id: int | None = None
        self.answer: Answer | None = None
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        ws = self.ws
        await ws.accept()
        if not allowed(self.config.token, ws.headers, ws.query_params):
            self.service.metrics.error("unauthorized")
            await self._send({"type": "error", "message": "unauthorized: send the server's token as "
                              "'Authorization: Bearer TOKEN' or ?token=TOKEN"})
            await ws.close(POLICY_VIOLATION)
            return
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await self._on_frame(message.get("text"))
        except _Gone:
            pass
        finally:
            if self.answer is not None:
                self.answer.cancel()
            if self.task is not None:
                await asyncio.gather(self.task, return_exceptions=True)

    async def _on_frame(self, text: str | None) -> None:
        if text is None:
            await self._error("binary frames are not accepted: send JSON or plain text", "bad_request")
            return
        try:
            frame = chat_frame(text, self.config.max_message_chars)
            if frame.stop:
                if self.answer is not None:
                    self.answer.cancel()
                return
            if self.task is not None and not self.task.done():
                raise RequestError("an answer is still streaming: wait for its \"done\" or send {\"type\": \"stop\"}")
            job = self._job(frame)
        except RequestError as exc:
            await self._error(str(exc), "bad_request")
            return
        self.answer = self.service.answer(job, "websocket")
        self.task = asyncio.create_task(self._stream(self.answer))

    def _job(self, frame: ChatFrame) -> Job:
        settings = generation_settings(self.service.app.settings, frame.options)
        conversation = frame.conversation_id if frame.conversation_id is not None else self.conversation_id
        return Job(frame.text, settings, frame.greedy, frame.seed, conversation)

    async def _stream(self, answer: Answer) -> None:
        try:
            await answer.begin()
        except QueueFull as exc:
            await self._send({"type": "error", "message": str(exc), "retry_after": exc.retry_after})
            return
        except StreamChatError as exc:
            await self._send({"type": "error", "message": str(exc)})
            return
        try:
            async for delta in answer.deltas():
                await self._send({"type": "delta", "text": delta})
        except _Gone:
            return
        except Exception as exc:  # the answer failed: what was streamed is stored with stop reason "error"
            self._follow(answer)
            await self._send({"type": "error", "message": crash.one_line(exc, "answering")})
            return
        result = self._follow(answer)
        assert result is not None  # the stream ended without an error: the turn ran
        done: dict[str, Any] = {"type": "done", "conversation_id": result.conversation_id,
                                "stop_reason": result.stopped, "timings": answer.timings(), "notes": result.notes}
        if result.blocked_reason:
            done["blocked_reason"] = result.blocked_reason
        await self._send(done)

    def _follow(self, answer: Answer) -> TurnResult | None:
        """The answer's result (set once its stream has ended; None when the turn failed before it began, e.g. an
        unknown conversation_id); its conversation becomes the connection's."""
        result = answer.result
        if result is not None and result.conversation_id is not None:
            self.conversation_id = result.conversation_id
        return result

    async def _error(self, message: str, kind: str) -> None:
        self.service.metrics.error(kind)
        await self._send({"type": "error", "message": message})

    async def _send(self, frame: dict[str, Any]) -> None:
        try:
            await self.ws.send_json(frame)
        except Exception as exc:  # closed by the client (the exception type depends on the ASGI server)
            if self.answer is not None:
                self.answer.cancel()
            raise _Gone from exc


async def chat_socket(ws: WebSocket, service: Service, config: ServiceConfig) -> None:
    with contextlib.suppress(_Gone):
        await ChatConnection(ws, service, config).run()
