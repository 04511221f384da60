"""Engine replicas shared by all requests: a bounded FIFO queue in front of N loaded models.

Each replica is its own engine (its own KV cache), used by one answer at a time. A request waits, in arrival order
(a replica handed back goes straight to the longest-waiting request), until a replica is free; when more requests already wait
than the queue allows, it is refused at once with ``QueueFull``. Replicas are handed back from the worker thread that
ran the answer, so a replica is free exactly when its engine is idle, whatever the client did meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import StreamChatError
from appliance.loading import LoadedModel


class QueueFull(StreamChatError):
    """Every replica is busy and the waiting queue is full; ``retry_after`` is the hint in seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the server is busy ({waiting} requests waiting for a free model): try again in "
                         f"{retry_after} s")
        self.retry_after = retry_after


class NotReady(StreamChatError):
    """Not every replica has loaded its model yet."""


@dataclass
class Replica:
    index: int
    model: LoadedModel


class EnginePool:
    """``size`` replicas, added as they load; ``queue_limit`` requests may wait for one."""

    def __init__(self, size: int, queue_limit: int, retry_after: int) -> None:
        self.size, self.queue_limit, self.retry_after = size, queue_limit, retry_after
        self.replicas: list[Replica] = []
        self._free: list[Replica] = []
        self._waiters: deque[asyncio.Future[Replica]] = deque()  # first come, first served
        self._loop: asyncio.AbstractEventLoop | None = None
        self.busy = 0  # replicas running an answer

    @property
    def ready(self) -> bool:
        return len(self.replicas) == self.size

    @property
    def waiting(self) -> int:
        """Requests waiting for a replica (the queue depth)."""
        return len(self._waiters)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that serves requests: replicas are added and handed back on it."""
        self._loop = loop

    def add(self, replica: Replica) -> None:
        """Called from the loading thread when a replica's model is loaded."""
        self._threadsafe(self._add, replica)

    def _add(self, replica: Replica) -> None:
        self.replicas.append(replica)
        self._give(replica)

    async def acquire(self) -> Replica:
        """The next free replica, after the requests that came earlier; NotReady or QueueFull at once."""
        if not self.ready:
            raise NotReady(f"the model is still loading ({len(self.replicas)} of {self.size} replicas ready): try "
                           "again when /ready answers 200")
        if self._free and not self._waiters:
            self.busy += 1
            return self._free.pop()
        if len(self._waiters) >= self.queue_limit:
            raise QueueFull(len(self._waiters), self.retry_after)
        turn: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed a replica just as the request was cancelled
                self._release(turn.result())
            raise
        finally:
            if turn in self._waiters:
                self._waiters.remove(turn)

    def release(self, replica: Replica) -> None:
        """Hand a replica back; safe from any thread (the worker that ran the answer calls it)."""
        self._threadsafe(self._release, replica)

    def _release(self, replica: Replica) -> None:
        self.busy -= 1
        self._give(replica)

    def _give(self, replica: Replica) -> None:
        """To the longest-waiting request, else to the free list."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                self.busy += 1
                turn.set_result(replica)
                return
        self._free.append(replica)

    def _threadsafe(self, call: Callable[[Replica], None], replica: Replica) -> None:
        if self._loop is None:
            raise RuntimeError("EnginePool.bind was not called")
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone, nobody needs the replica
            self._loop.call_soon_threadsafe(call, replica)
