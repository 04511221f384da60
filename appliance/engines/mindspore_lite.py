"""The Ascend targets' engine: MindSpore Lite, in a step-server subprocess under the Python that has it.

``STREAMCHAT_LITE_PYTHON`` (or the current interpreter, when it can import mindspore_lite) names that Python. A
crashed or hung server is reported as an EngineError; the next sequence starts a new server, and the conversation
(kept by the session and history) goes on. Loading (converting on first use, then compiling every graph) has its own
deadline, ``STREAMCHAT_LITE_LOAD_TIMEOUT`` seconds: hours for a 6B model on a board, where a step takes seconds.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import numpy as np

from appliance.engines import DEVICES
from appliance.engines.lite_server import STAGES, ProtocolError, encode_frame, frame_length, graph_file_name, parse_frame
from appliance.errors import BundleError, EngineError

SERVER = Path(__file__).with_name("lite_server.py")
REPLY_TIMEOUT_S = 600  # a reset or one step; loading has LOAD_TIMEOUT
LOAD_TIMEOUT = "STREAMCHAT_LITE_LOAD_TIMEOUT"
LOAD_TIMEOUT_S = 4 * 3600  # converting and compiling a 6B model on a 310B board (swap, one compile core) takes hours
LOAD_TIMEOUT_RANGE = (10, 7 * 24 * 3600)
CHUNK = 1 << 20


def lite_python() -> str:
    """The interpreter that runs the step server."""
    configured = os.environ.get("STREAMCHAT_LITE_PYTHON")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise EngineError(f"STREAMCHAT_LITE_PYTHON={configured} is not an executable file: set it to a Python that "
                              "has the mindspore_lite wheel (e.g. Lite 2.0.0 needs Python 3.7)")
        return configured
    try:
        import mindspore_lite  # noqa: F401
    except ImportError as exc:
        raise EngineError("MindSpore Lite is not importable here: set STREAMCHAT_LITE_PYTHON to a Python that has "
                          "the mindspore_lite wheel (e.g. Lite 2.0.0 needs Python 3.7)") from exc
    return sys.executable


def configured_load_timeout() -> float:
    """Seconds a load may take: ``STREAMCHAT_LITE_LOAD_TIMEOUT``, or LOAD_TIMEOUT_S."""
    value = os.environ.get(LOAD_TIMEOUT)
    if value is None:
        return LOAD_TIMEOUT_S
    low, high = LOAD_TIMEOUT_RANGE
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not low <= seconds <= high:  # also refuses nan and inf
        raise EngineError(f"{LOAD_TIMEOUT}={value[:40]!r} is not a number of seconds from {low} to {high}")
    return seconds


def _end(proc: subprocess.Popen) -> None:
    """Kill and reap a server (also at interpreter exit, so none outlives the app) and close our ends of its pipes."""
    if proc.poll() is None:
        proc.kill()
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout):
        with suppress(OSError):
            pipe.close()


def _check_reply(reply: dict, values: list[np.ndarray], shapes: list[tuple[int, ...]]) -> str | None:
    """The server's error message, or None for an ok reply that carries float arrays of exactly ``shapes`` (and, for a
    run, the bytes the server copied as ``host_bytes``)."""
    if "error" in reply:
        if not isinstance(reply["error"], str):
            raise ProtocolError("an error reply whose \"error\" is not a string")
        return " ".join(reply["error"].split())[:500]
    if reply.get("ok") is not True:
        raise ProtocolError("a reply with neither \"ok\": true nor \"error\"")
    if [v.shape for v in values] != shapes or any(v.dtype.kind != "f" for v in values):
        got = ", ".join(f"{v.dtype}{list(v.shape)}" for v in values) or "no arrays"
        raise ProtocolError(f"{got} where float arrays {[list(s) for s in shapes]} were asked for")
    moved = reply.get("host_bytes", 0)
    if type(moved) is not int or moved < 0:
        raise ProtocolError("a reply whose \"host_bytes\" is not a count of bytes")
    return None


def _progress(reply: dict, values: list[np.ndarray], request: dict) -> tuple[str, str] | None:
    """A load's progress frame as (stage, graph), or None for a reply; a frame with any other op, or a progress frame
    that answers anything but a load, is a protocol error."""
    if "op" not in reply:
        return None
    if reply["op"] != "progress":
        raise ProtocolError(f"a frame with the unknown op {str(reply['op'])[:40]!r}")
    if request["op"] != "load":
        raise ProtocolError(f"a progress frame in reply to a {request['op']} request")
    if set(reply) != {"op", "stage", "graph", "arrays"} or reply["stage"] not in STAGES or values \
            or not isinstance(reply["graph"], str) or reply["graph"] not in request["graphs"]:
        raise ProtocolError(f"a progress frame that is not {{\"op\": \"progress\", \"stage\": one of {', '.join(STAGES)}, "
                            "\"graph\": a graph being loaded}} without arrays")
    return reply["stage"], reply["graph"]


class LiteStepServer:
    """A GraphRunner backed by the step server; restarts it when it has died.

    Every reply must arrive whole within ``timeout`` seconds of the request (``load_timeout`` for the load, None:
    ``configured_load_timeout()``) and pass the frame checks of ``lite_server.parse_frame`` and ``_check_reply``;
    otherwise, and on Ctrl-C while waiting, the server is killed and reaped, and the next sequence starts a new one.
    The load's progress frames (each stage of each graph at most once) go to ``progress`` as one line each.
    """

    def __init__(self, graphs: dict[str, dict[str, str]], cache_dir: Path, vocab_size: int, device: str = "cpu",
                 device_id: int = 0, threads: int | None = None, timeout: float = REPLY_TIMEOUT_S,
                 load_timeout: float | None = None, progress: Callable[[str], None] = lambda _: None,
                 runtime_config: str = "", optimize: str = "general") -> None:
        """``graphs``: per graph key, what ``lite_server.Server.load`` takes (``static.lite_graphs``);
        ``runtime_config``: the text of the bundle's runtime config; ``optimize``: the converter's optimize mode."""
        for name in graphs:
            try:
                graph_file_name(name)
            except ValueError as exc:
                raise BundleError(f"this bundle's {exc}: re-export the bundle") from None
        if device not in DEVICES:
            raise EngineError(f"MindSpore Lite device {device!r} is not one of {', '.join(DEVICES)}")
        self.load_request = {"op": "load", "graphs": graphs, "runtime_config": runtime_config, "optimize": optimize,
                             "cache_dir": str(cache_dir), "device": device, "device_id": device_id,
                             "threads": threads or 0}
        self.vocab_size, self.timeout, self.progress = vocab_size, timeout, progress
        self.load_timeout = configured_load_timeout() if load_timeout is None else load_timeout
        self.proc: subprocess.Popen | None = None
        self.host_bytes: int | None = None  # what the server copied for the last request (``Server.run``)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _start(self) -> None:
        command = [lite_python(), str(SERVER)]
        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)
        except OSError as exc:
            raise EngineError(f"cannot start the MindSpore Lite step server with {command[0]} ({exc.strerror}): set "
                              "STREAMCHAT_LITE_PYTHON to a Python that has the mindspore_lite wheel") from exc
        weakref.finalize(self, _end, self.proc)
        for pipe in (self.proc.stdin, self.proc.stdout):  # reads and writes wait in select, up to the deadline
            os.set_blocking(pipe.fileno(), False)
        try:
            self._call(self.load_request)
        except EngineError:
            _end(self.proc)
            raise

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _call(self, header: dict, arrays: list[np.ndarray] = (), shapes: list[tuple[int, ...]] = ()) -> list[np.ndarray]:
        """Send a request and return the reply's arrays, which must be floats of ``shapes``."""
        timeout = self.load_timeout if header["op"] == "load" else self.timeout
        deadline = time.monotonic() + timeout
        try:
            self._send(encode_frame(header, arrays), deadline)
            reply, values = self._receive_reply(header, deadline)
            error = _check_reply(reply, values, list(shapes))
        except (ProtocolError, EOFError, OSError) as exc:
            _end(self.proc)
            raise self._failure(exc, header["op"], timeout) from exc
        except BaseException:  # Ctrl-C while waiting: the server may be mid-frame, so it goes
            _end(self.proc)
            raise
        if error is not None:
            raise EngineError(f"MindSpore Lite: {error}")
        self.host_bytes = reply.get("host_bytes")
        return values

    def _receive_reply(self, request: dict, deadline: float) -> tuple[dict, list[np.ndarray]]:
        """The reply to ``request``, after the progress frames of a load, each passed on to ``progress``."""
        seen = set()
        while True:
            reply, values = self._receive(deadline)
            step = _progress(reply, values, request)
            if step is None:
                return reply, values
            if step in seen:
                raise ProtocolError(f"a second progress frame for {step[0]} {step[1]}")
            seen.add(step)
            number = list(request["graphs"]).index(step[1]) + 1
            self.progress(f"MindSpore Lite: {step[0]} {step[1]} (graph {number} of {len(request['graphs'])})")

    def _failure(self, exc: BaseException, op: str, timeout: float) -> EngineError:
        if isinstance(exc, TimeoutError):
            hint = f" (loading converts and compiles every graph: raise {LOAD_TIMEOUT})" if op == "load" else ""
            return EngineError(f"the MindSpore Lite step server did not answer within {timeout:g} s and was "
                               f"stopped; send the message again to restart it{hint}")
        if isinstance(exc, ProtocolError):
            return EngineError(f"the MindSpore Lite step server sent a bad reply ({exc}) and was stopped; send the "
                               "message again to restart it")
        return self._stopped()

    def _wait(self, fd: int, write: bool, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or not any(select.select([] if write else [fd], [fd] if write else [], [], left)):
            raise TimeoutError

    def _send(self, data: bytes, deadline: float) -> None:
        fd, view = self.proc.stdin.fileno(), memoryview(data)
        while view:
            self._wait(fd, True, deadline)
            with suppress(BlockingIOError):
                view = view[os.write(fd, view[:CHUNK]):]

    def _read(self, size: int, deadline: float) -> bytearray:
        fd, data = self.proc.stdout.fileno(), bytearray()
        while len(data) < size:
            self._wait(fd, False, deadline)
            with suppress(BlockingIOError):
                chunk = os.read(fd, min(size - len(data), CHUNK))
                if not chunk:
                    raise EOFError("the step server closed its output")
                data += chunk
        return data

    def _receive(self, deadline: float) -> tuple[dict, list[np.ndarray]]:
        rest, head_len = frame_length(bytes(self._read(8, deadline)))
        return parse_frame(self._read(rest, deadline), head_len)

    def _stopped(self) -> EngineError:
        code = self.proc.poll() if self.proc else None
        return EngineError(f"the MindSpore Lite step server stopped (exit code {code}); your conversation is kept and "
                           "the next message restarts it")

    def reset(self) -> None:
        """Start of a sequence: a server that is dead or fails to reset is replaced by a new one."""
        if self._alive():
            try:
                self._call({"op": "reset"})
                return
            except EngineError:
                _end(self.proc)
        self._start()
        self._call({"op": "reset"})

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if not self._alive():
            raise self._stopped()
        names = list(inputs)
        batch = len(inputs["input_ids"])
        (logits,) = self._call({"op": "run", "graph": graph, "names": names}, [inputs[n] for n in names],
                               [(batch, self.vocab_size)])
        return logits

    def close(self) -> None:
        """Let the server exit at the end of its input; kill it if it has not within 10 s."""
        if self.proc is not None:
            with suppress(OSError):
                self.proc.stdin.close()
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            _end(self.proc)
