"""An engine in a child process of its own: one per accelerator device (``streamchat serve --devices``).

Why a process: MindSpore sets its device once per process (a second card needs a second process), and a runtime that
crashes takes only its own process down. Only the engine's calls cross the boundary: the generator, the safety filter
and the history stay in the server process, so every replica runs the one ``ChatSession`` pipeline. ``WorkerEngine``
is the parent's side (an ``Engine``); ``main`` runs in the child.

Frames are the step server's (``lite_server``: a length prefix, a JSON header, raw arrays of a few plain dtypes, the
same strict checks on both sides); nothing is unpickled on either side. Requests go to the child's stdin, replies come
from a private copy of its stdout (fd 1 itself points at stderr, so a runtime that prints cannot break a frame):

    {"op": "open", "bundle": path, "engine": name, "options": {...}}   -> {"ok", "name", "max_context", "label", ...}
    {"op": "prefill"} + ids [L] i8, position_ids [2, L] i8, mask [L, L] b1 -> {"ok", "engine_s"} + logits [vocab] f4
    {"op": "step", "token": id} + position_ids [2] i8                    -> {"ok", "engine_s"} + logits [vocab] f4
    a failed call                                                        -> {"error": one line}; the child goes on

``engine_s`` is the time the engine's own call took in the child: the rest of a call's time is the boundary's cost
(``WorkerEngine.engine_s``; bench/device_worker.py). A prefill starts a new sequence (the previous one is retired, as
on the cpu engine). Cancelling stays the generator's, between calls: one call is one token (or one prompt), so there
is nothing to interrupt in the child. At the end of its input (the server closed the pipe, or exited) the child exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import BinaryIO

import numpy as np

from appliance.bundle import Bundle
from appliance.engines import EngineOptions
from appliance.engines.lite_server import ProtocolError, encode_frame, frame_length, parse_frame, read_frame, write_frame
from appliance.errors import EngineError
from appliance.loading import LoadedModel, open_bundle

REPLY_TIMEOUT_S = 1800  # one call; a prefill of a new gear may compile its graph first (minutes for a 6B model).
# Loading has no deadline (Lite converts a 6B model for hours on a board, under its own deadline): a worker that
# dies while loading ends the wait at once.
PIPE_BYTES = 1 << 20  # a full vocabulary's fp32 logits (522 KB for ChatGLM-6B) in one pipe write
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), named in fcntl only from Python 3.10
CLOSE_WAIT_S = 10


OPENED_WITH = ("threads", "context", "device", "device_id", "weights")  # the EngineOptions open_bundle takes


def load_in_worker(path: Path, kind: str, options: EngineOptions) -> LoadedModel:
    """``appliance.loading.open_bundle`` run in a new worker process: the engine (loaded and warmed up) there, the
    tokenizer here. Engine ``kind`` with ``options`` (``progress`` aside: the worker prints it on stderr)."""
    bundle = Bundle.open(path)
    engine = WorkerEngine(bundle.path, kind, options, bundle.config.vocab_size)
    return LoadedModel(engine, bundle.tokenizer(), engine.label, engine.summary)


_loading: set[subprocess.Popen] = set()  # workers still opening their model: no caller holds them yet


def stop_loading() -> None:
    """Shutdown: kill the workers still loading (their ``WorkerEngine`` then raises). At interpreter exit the
    finalizers would, but a server stopped by SIGTERM dies of the signal uvicorn raises again, and no exit hook runs."""
    for proc in list(_loading):
        _end(proc)


def _end(proc: subprocess.Popen) -> None:
    """Kill and reap a worker (also at interpreter exit, so none outlives the server) and close our pipe ends."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=CLOSE_WAIT_S)
    for pipe in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            pipe.close()


class WorkerEngine:
    """``bundle`` opened on engine ``kind`` with ``options`` in a new child process; blocks until it has loaded (and
    warmed up). Its logits must be fp32 [``vocab_size``]. ``label`` and ``summary`` are what
    ``appliance.loading.open_bundle`` reports in the child."""

    def __init__(self, bundle: Path, kind: str, options: EngineOptions, vocab_size: int,
                 timeout: float = REPLY_TIMEOUT_S) -> None:
        self.timeout, self.vocab_size = timeout, vocab_size
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.engines.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        weakref.finalize(self, _end, self.proc)
        with contextlib.suppress(OSError):  # a smaller pipe only costs more wake-ups per logits frame
            fcntl.fcntl(self.proc.stdout.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
        self._broken = False
        self._sequence: WorkerSequence | None = None
        self.engine_s = 0.0  # the engine's own time in the child for the last call
        _loading.add(self.proc)
        try:
            info, _ = self._call({"op": "open", "bundle": str(bundle), "engine": kind,
                                  "options": {name: getattr(options, name) for name in OPENED_WITH}}, None, loading=True)
            if not (isinstance(info.get("name"), str) and type(info.get("max_context")) is int
                    and isinstance(info.get("label"), str) and isinstance(info.get("summary"), dict)):
                raise self._failure(ProtocolError("an open reply without name, max_context, label and summary"))
        except BaseException:
            _end(self.proc)
            raise
        finally:
            _loading.discard(self.proc)
        self.pid: int = self.proc.pid
        self.name, self.max_context, self.label, self.summary = (info["name"], info["max_context"], info["label"],
                                                                 info["summary"])

    @property
    def alive(self) -> bool:
        """False once the child has exited, or was stopped after a bad or late reply."""
        return not self._broken and self.proc.poll() is None

    def wait(self) -> str:
        """Block until the child exits; how it ended, in words."""
        self.proc.wait()
        return self.ending()

    def ending(self) -> str:
        """How the child ended (``was stopped`` while it still runs, the moment before it is killed)."""
        code = self.proc.poll()
        how = "was stopped" if code is None else f"was killed by signal {-code}" if code < 0 else f"exited ({code})"
        return f"the engine worker (pid {self.proc.pid}) {how}"

    def start(self) -> WorkerSequence:
        self._sequence = WorkerSequence(self)
        return self._sequence

    def close(self) -> None:
        """Let the child exit at the end of its input; kill it if it has not within CLOSE_WAIT_S."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=CLOSE_WAIT_S)
        _end(self.proc)

    def _call(self, header: dict, vocab: int | None, arrays: tuple[np.ndarray, ...] = (),
              loading: bool = False) -> tuple[dict, np.ndarray]:
        """Send a request; the reply's header and, when ``vocab`` is given, its fp32 logits [vocab]."""
        if not self.alive:
            raise self._stopped()
        try:
            self._send(encode_frame(header, arrays))
            reply, values = self._receive(None if loading else time.monotonic() + self.timeout)
            error = reply.get("error")
            if error is None and (reply.get("ok") is not True or len(values) != (vocab is not None)
                                  or (vocab is not None and (values[0].dtype != np.float32
                                                             or values[0].shape != (vocab,)))):
                raise ProtocolError(f"a reply that is not ok with {'no arrays' if vocab is None else f'logits [{vocab}]'}")
        except (ProtocolError, EOFError, OSError, TimeoutError) as exc:
            self._broken = True
            _end(self.proc)
            raise self._failure(exc) from exc
        except BaseException:  # Ctrl-C while waiting: the child may be mid-frame, so it goes
            self._broken = True
            _end(self.proc)
            raise
        if error is not None:
            raise EngineError(" ".join(str(error).split())[:500])
        self.engine_s = float(reply.get("engine_s", 0.0))
        return reply, values[0] if values else np.empty(0, np.float32)

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.proc.stdin.write(view):]

    def _read(self, size: int, deadline: float | None) -> bytearray:
        data = bytearray(size)
        view, got, fd = memoryview(data), 0, self.proc.stdout.fileno()
        while got < size:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            count = self.proc.stdout.readinto(view[got:])
            if not count:
                raise EOFError("the worker closed its output")
            got += count
        return data

    def _receive(self, deadline: float | None) -> tuple[dict, list[np.ndarray]]:
        rest, head_len = frame_length(bytes(self._read(8, deadline)))
        return parse_frame(self._read(rest, deadline), head_len)

    def _failure(self, exc: BaseException) -> EngineError:
        if isinstance(exc, TimeoutError):
            return EngineError(f"the engine worker (pid {self.proc.pid}) did not answer within {self.timeout:g} s and "
                               "was stopped")
        if isinstance(exc, ProtocolError):
            return EngineError(f"the engine worker (pid {self.proc.pid}) sent a bad reply ({exc}) and was stopped")
        return self._stopped()

    def _stopped(self) -> EngineError:
        return EngineError(f"{self.ending()}; the conversation so far is kept: send the message again")


class WorkerSequence:
    """One conversation's KV cache in the child; a newer sequence of the same engine retires this one."""

    def __init__(self, engine: WorkerEngine) -> None:
        self.engine = engine

    def _check(self) -> None:
        if self.engine._sequence is not self:
            raise EngineError("this sequence was retired by a newer one on the same engine worker")

    def prefill(self, ids: np.ndarray, position_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self._check()
        arrays = (np.asarray(ids, np.int64), np.asarray(position_ids, np.int64), np.asarray(mask, np.bool_))
        return self.engine._call({"op": "prefill"}, self.engine.vocab_size, arrays)[1]

    def step(self, token_id: int, position_ids: np.ndarray) -> np.ndarray:
        self._check()
        return self.engine._call({"op": "step", "token": int(token_id)}, self.engine.vocab_size,
                                 (np.asarray(position_ids, np.int64),))[1]


def _arrays(arrays: list[np.ndarray], shapes: list[tuple[str, int]]) -> list[np.ndarray]:
    """The request's arrays, checked against (dtype kind, dimensions) each."""
    if len(arrays) != len(shapes) or any(a.dtype.kind != kind or a.ndim != ndim
                                         for a, (kind, ndim) in zip(arrays, shapes, strict=True)):
        raise ProtocolError("a request whose arrays are not " + ", ".join(f"{k}{n}d" for k, n in shapes))
    return arrays


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """The child's loop: the open request first, then prefill and step requests until the end of input."""
    from appliance import crash

    model, sequence = None, None
    while True:
        try:
            request, arrays = read_frame(requests)
        except EOFError:
            return
        try:
            op = request.get("op")
            if model is None:
                if op != "open":
                    raise ProtocolError("the first request must be open")
                model = open_bundle(Path(request["bundle"]), engine=request["engine"], **request["options"],
                                    progress=lambda line: print(line, file=sys.stderr, flush=True))
                write_frame(replies, {"ok": True, "name": model.engine.name, "max_context": model.engine.max_context,
                                      "label": model.label, "summary": model.summary})
                continue
            started = time.perf_counter()
            if op == "prefill":
                ids, positions, mask = _arrays(arrays, [("i", 1), ("i", 2), ("b", 2)])
                sequence = model.engine.start()
                logits = sequence.prefill(ids, positions, mask)
            elif op == "step" and sequence is not None and type(request.get("token")) is int:
                (positions,) = _arrays(arrays, [("i", 1)])
                logits = sequence.step(request["token"], positions)
            else:
                raise ProtocolError(f"an unexpected request {str(op)[:40]!r}")
            write_frame(replies, {"ok": True, "engine_s": time.perf_counter() - started},
                        [np.asarray(logits, np.float32)])
        except ProtocolError:
            raise  # nothing after a broken request can be trusted: the child exits, the server sees it stop
        except Exception as exc:
            write_frame(replies, {"error": crash.one_line(exc, "running the engine")})


def main() -> None:
    # Ctrl-C reaches the whole process group, and a service manager may send SIGTERM to every process of the unit: the
    # server finishes its answers first, then closes our input (and kills us if we do not leave within CLOSE_WAIT_S)
    for ending in (signal.SIGINT, signal.SIGTERM):
        signal.signal(ending, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
