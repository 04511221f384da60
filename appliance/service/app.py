"""The FastAPI application: routes only; the work is in ``answer`` (the pipeline), ``pool`` and ``metrics``.

``/health`` and ``/ready`` answer without a token (probes); every other route needs it when one is configured.
CORS headers are sent only to the pages of ``--allow-origin`` origins (Starlette's ``CORSMiddleware``, added only
then), so a browser lets no page of another site read an answer or POST JSON; ``guard`` refuses the WebSocket
handshakes and the Host headers of other sites, and more connections from one address than it allows.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware

from appliance.service.answer import Service
from appliance.service.auth import allowed
from appliance.service.config import ServiceConfig
from appliance.service.errors import ApiError, api_error_response
from appliance.service.guard import ClientLimit, SiteGuard, cors_options
from appliance.service.openai_routes import openai_router
from appliance.service.ws import chat_socket

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def create_app(service: Service, config: ServiceConfig,
               lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None) -> FastAPI:
    def authorized(request: Request) -> None:
        if not allowed(config.token, request.headers):
            service.metrics.error("unauthorized")
            raise ApiError(401, "unauthorized: send the server's token as 'Authorization: Bearer TOKEN'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="StreamChat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_exception_handler(ApiError, api_error_response)
    app.add_middleware(ClientLimit, config=config, metrics=service.metrics)
    app.add_middleware(SiteGuard, config=config, metrics=service.metrics)  # added last: runs first
    if config.allow_origins:  # outermost, so that the guards' refusals carry CORS headers too
        app.add_middleware(CORSMiddleware, **cors_options(config))

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        pool = service.pool
        body = {"status": pool.status, "replicas": len(pool.replicas), "of": pool.size}
        if pool.down:  # degraded: the others serve while these restart
            body["down"] = [{"replica": r.index, "device": r.device, "reason": r.stopped} for r in pool.down.values()]
        return JSONResponse(body, status_code=200 if pool.ready else 503)

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type=PROMETHEUS_TEXT)

    app.include_router(openai_router(service, config), dependencies=[Depends(authorized)])

    @app.websocket("/ws/chat")
    async def ws_chat(ws: WebSocket) -> None:
        await chat_socket(ws, service, config)

    return app

