"""``/v1/models`` and ``/v1/chat/completions``: the OpenAI-compatible endpoints.

Their answers are not stored in the history: an OpenAI client sends the whole conversation with every request and
has no conversation id, so storing would make each request a new, partial copy of the same conversation.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from appliance import crash
from appliance.errors import PromptError
from appliance.service import openai_format as fmt
from appliance.service.answer import Answer, ConversationBusy, Job, Service, error_kind
from appliance.service.config import ServiceConfig
from appliance.service.errors import ApiError
from appliance.service.options import RequestError, generation_settings, malformed
from appliance.service.pool import NotReady, QueueFull
from appliance.settings import SettingsError


def api_error(exc: BaseException, config: ServiceConfig) -> ApiError:
    """The HTTP status and OpenAI error object of a failed answer."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), "rate_limit_error", "queue_full", {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, NotReady):
        return ApiError(503, str(exc), "server_error", "not_ready", {"Retry-After": str(config.retry_after_s)})
    if isinstance(exc, RequestError | PromptError | SettingsError | ConversationBusy):
        return ApiError(400, str(exc))
    return ApiError(500, crash.one_line(exc, "answering"), "server_error")


async def read_json(request: Request, limit: int) -> object:
    """The request body as JSON, refused with 413 past ``limit`` bytes (before reading when Content-Length says so),
    and with 415 unless it is declared ``application/json`` (a page of another site cannot POST that without a CORS
    preflight, which the server grants only to ``--allow-origin`` origins)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"the request body must be JSON sent as 'Content-Type: application/json', got "
                       f"{json.dumps(media_type or '(none)')[:60]}", code="unsupported_media_type")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body has {int(length)} bytes; the limit is {limit}", code="too_large")
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"the request body is larger than the limit of {limit} bytes", code="too_large")
    except ClientDisconnect as exc:  # an ordinary event, not a server fault: no traceback in the log
        raise ApiError(400, "the client disconnected before it had sent the whole request body") from exc
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser's recursion limit
        raise ApiError(400, f"malformed JSON: {malformed(exc)}") from exc


class AnswerStream(StreamingResponse):
    """A streamed answer that is cancelled whenever the response ends early (the client left, a send failed)."""

    def __init__(self, answer: Answer, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.answer.cancel()


def openai_router(service: Service, config: ServiceConfig) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models() -> JSONResponse:
        model = service.model_id
        data = [{"id": model, "object": "model", "created": int(time.time()), "owned_by": "streamchat"}] if model else []
        return JSONResponse({"object": "list", "data": data})

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        try:
            asked = fmt.parse_request(await read_json(request, config.max_body_bytes), config.max_message_chars)
            settings = generation_settings(service.app.settings, asked.options)
            if asked.system is not None:  # the request's system messages replace the configured system prompt
                settings.system_prompt = asked.system
        except RequestError as exc:
            service.metrics.error("bad_request")
            raise ApiError(400, str(exc)) from exc
        except ApiError as exc:
            service.metrics.error("too_large" if exc.status == 413 else "bad_request")
            raise
        answer = service.answer(Job(asked.query, settings, asked.greedy, asked.seed, None, asked.turns, store=False),
                                "openai")
        left = asyncio.create_task(_disconnect(request))  # leaving the queue, or the answer, cancels it
        left.add_done_callback(lambda task: task.cancelled() or answer.cancel())
        try:
            await answer.begin()
            ident, model = fmt.completion_id(), service.model_id
            if asked.stream:  # from here the StreamingResponse watches for the disconnect itself
                return AnswerStream(answer, _events(answer, ident, model, asked.include_usage, config))
            async for _ in answer.deltas():
                pass
        except Exception as exc:  # refused (queue full, not ready) or failed
            raise api_error(exc, config) from exc
        finally:
            left.cancel()
        return JSONResponse(fmt.completion(ident, model, answer.result))

    return router


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (its body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(answer: Answer, ident: str, model: str, include_usage: bool,
                  config: ServiceConfig) -> AsyncIterator[str]:
    """The answer as server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; a failure midway is
    one ``data: {"error": ...}`` event (the OpenAI SDK raises it as an APIError)."""
    yield fmt.chunk(ident, model, {"role": "assistant", "content": ""})
    try:
        async for delta in answer.deltas():
            yield fmt.chunk(ident, model, {"content": delta})
    except Exception as exc:
        failure = api_error(exc, config)
        yield f"data: {json.dumps(fmt.error_body(failure.message, failure.kind, error_kind(exc)))}\n\n"
    else:
        yield fmt.chunk(ident, model, {}, fmt.finish_reason(answer.result))
        if include_usage:
            yield fmt.chunk(ident, model, {}, usage_=fmt.usage(answer.result))
    yield "data: [DONE]\n\n"
