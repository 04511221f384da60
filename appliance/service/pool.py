"""Engine replicas shared by all requests: a bounded FIFO queue in front of N loaded models.

Each replica is its own engine (its own KV cache), used by one answer at a time. A request waits, in arrival order
(a replica handed back goes straight to the longest-waiting request), until a replica is free; when more requests already wait
than the queue allows, it is refused at once with ``QueueFull``. Replicas are handed back from the worker thread that
ran the answer, so a replica is free exactly when its engine is idle, whatever the client did meanwhile.

A replica whose engine runs in a worker process (``--devices``) can die on its own. It is then taken out (``lost``:
when its answer fails, or when its watcher sees the process exit while idle) and reported in ``down`` until the
``on_down`` callback (the server restarting it) adds it back; the other replicas go on serving the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from appliance.engines.worker import WorkerEngine
from appliance.errors import StreamChatError
from appliance.loading import LoadedModel


class QueueFull(StreamChatError):
    """Every replica is busy and the waiting queue is full; ``retry_after`` is the hint in seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the server is busy ({waiting} requests waiting for a free model): try again in "
                         f"{retry_after} s")
        self.retry_after = retry_after


class NotReady(StreamChatError):
    """Not every replica has loaded its model yet, or none is running."""


@dataclass(eq=False)
class Replica:
    """``device``: the accelerator id its worker process runs on; ``worker``: that process's engine (both None: the
    engine runs in the server's process); ``answers``: the requests handed to it; ``stopped``: why it is out of
    service (empty while it serves)."""

    index: int
    model: LoadedModel
    device: int | None = None
    worker: WorkerEngine | None = None
    answers: int = 0
    stopped: str = ""

    @property
    def usable(self) -> bool:
        return self.worker is None or self.worker.alive


class EnginePool:
    """``size`` replicas, added as they load; ``queue_limit`` requests may wait for one."""

    def __init__(self, size: int, queue_limit: int, retry_after: int) -> None:
        self.size, self.queue_limit, self.retry_after = size, queue_limit, retry_after
        self.replicas: list[Replica] = []
        self._free: list[Replica] = []
        self._waiters: deque[asyncio.Future[Replica]] = deque()  # first come, first served
        self._loop: asyncio.AbstractEventLoop | None = None
        self.busy = 0  # replicas running an answer
        self.started = False  # every replica has loaded once
        self.down: dict[int, Replica] = {}  # replica index -> the replica out of service (its worker stopped)
        self.restarting: set[int] = set()  # indices of the replicas in ``down`` that ``on_down`` is bringing back
        self.on_down: Callable[[Replica], None] = lambda _: None  # called on the loop when a replica is lost
        self.closing = False  # shutting down: a lost replica is not restarted

    @property
    def ready(self) -> bool:
        return len(self.replicas) == self.size

    @property
    def status(self) -> str:
        """``loading`` (not every replica has loaded yet), ``ready``, or ``degraded`` (a replica is down)."""
        return "ready" if self.ready else "degraded" if self.started else "loading"

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
        self.down.pop(replica.index, None)
        self.restarting.discard(replica.index)
        self.replicas.append(replica)
        self.started = self.started or self.ready
        self._give(replica)

    def lost(self, replica: Replica, reason: str) -> None:
        """A replica's worker has stopped (safe from any thread): out of service until ``on_down`` brings it back."""
        self._threadsafe(lambda r: self._lose(r, reason), replica)

    def _lose(self, replica: Replica, reason: str) -> None:
        if replica not in self.replicas:  # already lost (its answer failed and its watcher saw the exit)
            return
        self.replicas.remove(replica)
        if replica in self._free:
            self._free.remove(replica)
        replica.stopped = reason
        self.down[replica.index] = replica
        if not self.closing:
            self.restarting.add(replica.index)
            self.on_down(replica)

    def gave_up(self, replica: Replica) -> None:
        """``replica``'s restart failed (safe from any thread): it stays down. With no replica left and none
        restarting, the requests waiting get NotReady now instead of waiting for a replica that never comes."""
        self._threadsafe(self._give_up, replica)

    def _give_up(self, replica: Replica) -> None:
        self.restarting.discard(replica.index)
        if self.replicas or self.restarting:
            return
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_exception(self._none_running())

    async def acquire(self) -> Replica:
        """The next free replica, after the requests that came earlier; NotReady or QueueFull at once."""
        if not self.started:
            raise NotReady(f"the model is still loading ({len(self.replicas)} of {self.size} replicas ready): try "
                           "again when /ready answers 200")
        if not self.replicas:
            raise self._none_running()
        if self._free and not self._waiters:
            self.busy += 1
            replica = self._free.pop()
            replica.answers += 1
            return replica
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

    def _none_running(self) -> NotReady:
        return NotReady(f"no replica is running ({len(self.restarting)} of {len(self.down)} restarting after their "
                        "worker stopped): try again when /ready answers 200")

    def release(self, replica: Replica) -> None:
        """Hand a replica back; safe from any thread (the worker that ran the answer calls it)."""
        self._threadsafe(self._release, replica)

    def _release(self, replica: Replica) -> None:
        self.busy -= 1
        if not replica.usable:
            self._lose(replica, "its worker stopped while answering")
        elif replica in self.replicas:
            self._give(replica)

    def _give(self, replica: Replica) -> None:
        """To the longest-waiting request, else to the free list."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                self.busy += 1
                replica.answers += 1
                turn.set_result(replica)
                return
        self._free.append(replica)

    def _threadsafe(self, call: Callable[[Replica], None], replica: Replica) -> None:
        if self._loop is None:
            raise RuntimeError("EnginePool.bind was not called")
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone, nobody needs the replica
            self._loop.call_soon_threadsafe(call, replica)
