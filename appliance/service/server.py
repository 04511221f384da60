"""Run the service: load the replicas in the background (``appliance.service.replicas``; ``/ready`` turns 200 when
all are loaded) while uvicorn serves. A replica that cannot load stops the server, and ``serve`` raises its error
(one line from the CLI).

Shutdown (SIGTERM, Ctrl-C): uvicorn stops accepting, waits up to ``SHUTDOWN_GRACE_S`` for answers in flight, then
every answer still running is cancelled (stored as ``cancelled``) and given ``SHUTDOWN_GRACE_S`` to end, the worker
processes (``--devices``) are stopped and reaped (an answer whose worker hangs ends then, stored as ``error``) and
the worker threads joined.
"""

from __future__ import annotations

import asyncio
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
from appliance.service.pool import EnginePool
from appliance.service.replicas import ReplicaCollector, Replicas
from appliance.service.request_log import RequestLog

SHUTDOWN_GRACE_S = 10


def serve(config: ServiceConfig, app_context: AppContext, load: Callable[[int], LoadedModel]) -> None:
    """``load(i)`` opens replica ``i``'s model (its own engine and KV cache; on ``config.devices[i]`` when given)."""
    pool = EnginePool(config.size, config.queue, config.retry_after_s)
    service = Service(pool, app_context, Metrics(pool), RequestLog() if config.log_messages else None)
    service.metrics.registry.register(ReplicaCollector(pool))
    failure: list[BaseException] = []

    def failed(exc: BaseException) -> None:  # raised by ``serve`` once the server has stopped
        failure.append(exc)
        server.should_exit = True

    replicas = Replicas(pool, config, load, failed)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.bind(asyncio.get_running_loop())
        replicas.start()
        yield
        service.cancel_all(SHUTDOWN_GRACE_S)
        replicas.close()  # stops the workers: one that hangs fails its answer, which is then stored
        service.executor.shutdown(wait=True)

    app = create_app(service, config, lifespan)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           access_log=False, ws_max_size=config.max_body_bytes,
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S, server_header=False))
    try:
        server.run()
    finally:
        replicas.close()
    if failure:
        raise failure[0]
