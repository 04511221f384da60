"""One answer of the service: a ``ChatSession`` turn run on a replica in a worker thread, streamed to the event loop.

Every answer goes through ``appliance.session.ChatSession``, exactly as ``streamchat chat`` and ``generate`` do
(safety filter, context planning, history). Cancelling sets the session's cancel event, which the generator checks
between tokens, so the answer ends (and is stored as ``cancelled``) within one token.

The worker thread hands text to the event loop through a locked buffer, and wakes the loop only when the loop is
waiting. After sending a chunk the reader lets ``FRAME_INTERVAL_S`` pass (or the answer end) before it looks again,
so a fast model's tokens leave in one frame per interval instead of one wake-up, frame and GIL hand-over each; a
model slower than the interval still sends every token the moment it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from appliance.app import AppContext
from appliance.errors import StreamChatError
from appliance.history import HistoryError
from appliance.prompt import Turn
from appliance.service.metrics import Metrics
from appliance.service.pool import EnginePool, NotReady, QueueFull, Replica
from appliance.session import ChatSession, TurnResult
from appliance.settings import Settings

FRAME_INTERVAL_S = 0.02  # at most ~50 frames a second per answer: smooth to read, cheap to send


class ConversationBusy(StreamChatError):
    """Another request is answering, or waiting for a replica, in the same conversation."""


class Withdrawn(StreamChatError):
    """The request was cancelled (stop frame, client gone) while it waited for a replica."""


@dataclass(frozen=True)
class Job:
    """What to answer: ``store`` False answers from ``turns`` without the history (the OpenAI endpoint)."""

    query: str
    settings: Settings  # the app's settings with this request's generation options
    greedy: bool = False
    seed: int | None = None
    conversation_id: int | None = None
    turns: tuple[Turn, ...] = ()
    store: bool = True


def error_kind(exc: BaseException) -> str:
    """The ``streamchat_errors`` label of a failed answer."""
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, NotReady):
        return "not_ready"
    if isinstance(exc, HistoryError):
        return "history"
    if isinstance(exc, ConversationBusy):
        return "bad_request"
    return "engine" if isinstance(exc, StreamChatError) else "internal"


class Service:
    """The replicas, the app's history/safety context and the metrics, shared by every endpoint."""

    def __init__(self, pool: EnginePool, app: AppContext, metrics: Metrics,
                 request_log: Callable[[str, int | None, str], None] | None = None) -> None:
        self.pool, self.app, self.metrics, self.request_log = pool, app, metrics, request_log
        self.audit = metrics.audit(app.audit)  # the app's audit log, each hit counted in the metrics too
        self.executor = ThreadPoolExecutor(max_workers=pool.size, thread_name_prefix="streamchat-replica")
        self.running: set[Answer] = set()
        self._conversations: set[int] = set()  # conversations with an answer in flight

    @property
    def model_id(self) -> str:
        """The model's name in the API: its bundle folder's name ("" until a replica has loaded)."""
        return Path(self.pool.replicas[0].model.summary.get("path", "streamchat")).name if self.pool.replicas else ""

    def answer(self, job: Job, endpoint: str) -> Answer:
        if self.request_log is not None:  # only with --log-messages
            self.request_log(endpoint, job.conversation_id, job.query)
        return Answer(self, job, endpoint)

    def cancel_all(self, grace_s: float) -> None:
        """Shutdown: every answer in flight is cancelled, and ends within one token and is stored; waits up to
        ``grace_s`` for that. An engine worker that hangs gives no token, so its answer ends only once the worker is
        stopped (``Replicas.close``); then ``executor.shutdown`` joins the threads."""
        answers = list(self.running)
        for answer in answers:
            answer.cancel()
        futures.wait([a.work for a in answers if a.work is not None], timeout=grace_s)


class Answer:
    """``await begin()`` waits for a replica (QueueFull/NotReady at once) and starts the turn; ``deltas()`` streams
    it; ``result`` is the session's TurnResult once the stream has ended."""

    def __init__(self, service: Service, job: Job, endpoint: str) -> None:
        self.service, self.job, self.endpoint = service, job, endpoint
        self.received = time.perf_counter()
        self.first_token_s: float | None = None
        self.result: TurnResult | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()  # guards the four fields below, shared with the worker thread
        self._pending: list[tuple[float, str]] = []  # (when the worker made it, text) not yet read
        self._ended = False  # the worker has finished: nothing more comes
        self._wake_posted = False  # a wake-up is on its way to the loop, or the reader is not waiting
        self._woken: asyncio.Event | None = None  # set by the worker's wake-up; made on the loop in begin()
        self._error: BaseException | None = None
        self._acquiring: asyncio.Future[Replica] | None = None  # the wait for a replica, while queued
        self.work: futures.Future[None] | None = None  # the turn in its worker thread, once begun

    def cancel(self) -> None:
        """Ends the answer within one token; while it waits for a replica, it leaves the queue instead."""
        self._cancel.set()
        if self._acquiring is not None:
            self._acquiring.cancel()

    async def begin(self) -> None:
        service, conversation = self.service, self.job.conversation_id
        if conversation is not None and conversation in service._conversations:
            service.metrics.error("bad_request")
            raise ConversationBusy(f"conversation {conversation} is answering another message: wait for its end")
        if conversation is not None:  # claimed while queued, so a second request for it is refused, not queued
            service._conversations.add(conversation)
        self._acquiring = asyncio.ensure_future(service.pool.acquire())
        try:
            replica = await self._acquiring
        except BaseException as exc:  # refused, or the client left while queued: nothing runs, nothing is stored
            if conversation is not None:
                service._conversations.discard(conversation)
            if isinstance(exc, StreamChatError):
                service.metrics.error(error_kind(exc))
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and not (task is not None and task.cancelling()):
                raise Withdrawn("cancelled while waiting for a free model: nothing was answered or stored") from None
            raise
        if self._cancel.is_set():  # cancelled just as the replica was handed over
            service.pool.release(replica)
            if conversation is not None:
                service._conversations.discard(conversation)
            raise Withdrawn("cancelled while waiting for a free model: nothing was answered or stored")
        service.running.add(self)
        self._woken = asyncio.Event()
        self.work = service.executor.submit(self._work, replica, asyncio.get_running_loop())

    def _work(self, replica: Replica, loop: asyncio.AbstractEventLoop) -> None:
        """Runs in a worker thread: the turn, each delta handed to the reader, then the end."""
        job, model, app, started = self.job, replica.model, self.service.app, time.perf_counter()
        session = ChatSession(model.engine, model.tokenizer, job.settings, app.history if job.store else None,
                              app.rules, self.service.audit, model.label)
        try:
            session.open(job.conversation_id, list(job.turns))
            for delta in session.send(job.query, self._cancel, greedy=job.greedy, seed=job.seed):
                self._hand_over(loop, delta)
        except HistoryError as exc:  # this session ends with the request: one more try, else say what was lost
            self._error = exc
            if session.has_unsaved:  # the turn ran; storing it failed: a second try that works loses nothing
                try:
                    session.save_unsaved()
                    self._error = None
                except HistoryError as lost:
                    self._error = lost
        except BaseException as exc:  # reported by ``deltas`` on the event loop
            self._error = exc
        finally:
            self.result = session.last
            self.service.metrics.replica_busy(replica.index, time.perf_counter() - started)
            self.service.pool.release(replica)
            self._post(loop, self._settle)
            self._hand_over(loop, None)

    def _hand_over(self, loop: asyncio.AbstractEventLoop, delta: str | None) -> None:
        """In the worker thread: buffer a delta (None: the end) and wake the reader if it is waiting."""
        with self._lock:
            if delta is None:
                self._ended = True
            else:
                self._pending.append((time.perf_counter(), delta))
            wake, self._wake_posted = delta is None or not self._wake_posted, True
        if wake:
            assert self._woken is not None
            self._post(loop, self._woken.set)

    def _post(self, loop: asyncio.AbstractEventLoop, call: Callable[..., None], *args: object) -> None:
        try:
            loop.call_soon_threadsafe(call, *args)
        except RuntimeError:  # the loop has closed (shutdown): nobody reads this answer any more
            self._cancel.set()

    def _take(self) -> tuple[list[tuple[float, str]], bool]:
        """On the loop: what the worker has made since the last look, and whether it has ended. With nothing to
        read, the reader is about to wait, so the worker's next delta must wake it."""
        assert self._woken is not None
        self._woken.clear()
        with self._lock:
            pending, self._pending = self._pending, []
            if not pending and not self._ended:
                self._wake_posted = False
            return pending, self._ended

    def _settle(self) -> None:
        """On the event loop once the turn has ended, whether or not anyone still reads it: the bookkeeping."""
        service, metrics, result = self.service, self.service.metrics, self.result
        service.running.discard(self)
        if self.job.conversation_id is not None:
            service._conversations.discard(self.job.conversation_id)
        if result is not None:
            metrics.answers.labels(result.stopped or "error").inc()
            if result.generation is not None:
                metrics.tokens.inc(len(result.generation.token_ids))
                metrics.answer_quality(self.job.query, result.generation.token_ids, result.response)
        if self._error is not None:
            metrics.error(error_kind(self._error))

    async def deltas(self) -> AsyncIterator[str]:
        """The answer's text deltas; the turn's error, if it failed, is raised at the end (what was streamed is
        stored, with stop reason ``error``). Leaving early cancels the answer."""
        metrics, last, ended = self.service.metrics, None, False
        assert self._woken is not None, "begin() first"
        try:
            while True:
                pending, ended = self._take()
                if pending:
                    if last is None:
                        self.first_token_s = time.perf_counter() - self.received
                        metrics.ttft.observe(self.first_token_s)
                    for made, _ in pending:  # the gaps between tokens as the model made them
                        if last is not None:
                            metrics.token_gap(made - last)
                        last = made
                    yield "".join(text for _, text in pending)
                if ended:
                    break
                if pending:  # let the next tokens gather; meanwhile only the end wakes the reader
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._woken.wait(), FRAME_INTERVAL_S)
                else:
                    await self._woken.wait()
        finally:
            if not ended:
                self.cancel()
        metrics.latency.labels(self.endpoint).observe(time.perf_counter() - self.received)
        if self._error is not None:
            raise self._error

    def timings(self) -> dict:
        """The generation's timings plus what the client saw: time to first token and the whole request."""
        gen = self.result.generation if self.result is not None else None
        own = gen.timings() if gen is not None else {"tokens": 0}
        return {**own, "ttft_ms": None if self.first_token_s is None else round(self.first_token_s * 1000, 3),
                "total_ms": round((time.perf_counter() - self.received) * 1000, 3)}
