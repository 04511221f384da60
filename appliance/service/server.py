"""Run the service: load the replicas in a background thread (``/ready`` turns 200 when all are loaded) while uvicorn
serves. A replica that cannot load stops the server, and ``serve`` raises its error (one line from the CLI).

Shutdown (SIGTERM, Ctrl-C): uvicorn stops accepting, waits up to ``SHUTDOWN_GRACE_S`` for answers in flight, then
every answer still running is cancelled (stored as ``cancelled``) and the worker threads are joined.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from appliance.app import AppContext
from appliance.loading import LoadedModel
from appliance.service.answer import Service
from appliance.service.app import create_app
from appliance.service.config import ServiceConfig
from appliance.service.metrics import Metrics
from appliance.service.pool import EnginePool, Replica

SHUTDOWN_GRACE_S = 10


def serve(config: ServiceConfig, app_context: AppContext, load: Callable[[int], LoadedModel]) -> None:
    """``load(i)`` opens replica ``i``'s model (its own engine and KV cache)."""
    pool = EnginePool(config.replicas, config.queue, config.retry_after_s)
    service = Service(pool, app_context, Metrics(pool))
    failure: list[BaseException] = []

    def load_all() -> None:
        try:
            for index in range(config.replicas):
                model = load(index)
                pool.add(Replica(index, model))
            print(f"StreamChat serving {model.label} on http://{config.host}:{config.port} "
                  f"({config.replicas} replica(s))", file=sys.stderr, flush=True)
        except BaseException as exc:  # raised by ``serve`` once the server has stopped
            failure.append(exc)
            server.should_exit = True

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.bind(asyncio.get_running_loop())
        threading.Thread(target=load_all, name="streamchat-load", daemon=True).start()
        yield
        service.cancel_all()

    app = create_app(service, config, lifespan)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           access_log=False, ws_max_size=config.max_body_bytes,
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S, server_header=False))
    server.run()
    if failure:
        raise failure[0]
