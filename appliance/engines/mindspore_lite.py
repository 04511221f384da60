"""The Ascend targets' engine: MindSpore Lite, in a step-server subprocess under the Python that has it.

``STREAMCHAT_LITE_PYTHON`` (or the current interpreter, when it can import mindspore_lite) names that Python. A
crashed or hung server is reported as an EngineError; the next sequence starts a new server, and the conversation
(kept by the session and history) goes on.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import numpy as np

from appliance.engines.lite_server import read_frame, write_frame
from appliance.errors import EngineError

SERVER = Path(__file__).with_name("lite_server.py")
REPLY_TIMEOUT_S = 600  # first use converts ONNX to MindIR, which takes a while for a real model


def lite_python() -> str:
    """The interpreter that runs the step server."""
    configured = os.environ.get("STREAMCHAT_LITE_PYTHON")
    if configured:
        return configured
    try:
        import mindspore_lite  # noqa: F401
    except ImportError as exc:
        raise EngineError("MindSpore Lite is not importable here: set STREAMCHAT_LITE_PYTHON to a Python that has "
                          "the mindspore_lite wheel (e.g. Lite 2.0.0 needs Python 3.7)") from exc
    return sys.executable


class LiteStepServer:
    """A GraphRunner backed by the step server; restarts it when it has died."""

    def __init__(self, graphs: dict[str, str], cache_dir: Path, device: str = "cpu", device_id: int = 0,
                 threads: int | None = None) -> None:
        self.load_request = {"op": "load", "graphs": graphs, "cache_dir": str(cache_dir), "device": device,
                             "device_id": device_id, "threads": threads or 0}
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _start(self) -> None:
        self.proc = subprocess.Popen([lite_python(), str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self._call(self.load_request)

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _call(self, header: dict, arrays: list[np.ndarray] = ()) -> tuple[dict, list[np.ndarray]]:
        proc = self.proc
        try:
            write_frame(proc.stdin, header, arrays)
            ready, _, _ = select.select([proc.stdout], [], [], REPLY_TIMEOUT_S)
            if not ready:
                proc.kill()
                raise EngineError(f"the MindSpore Lite step server did not answer within {REPLY_TIMEOUT_S} s and was "
                                  "stopped; send the message again to restart it")
            reply, values = read_frame(proc.stdout)
        except (BrokenPipeError, EOFError, OSError) as exc:
            raise self._stopped() from exc
        if "error" in reply:
            raise EngineError(f"MindSpore Lite: {reply['error']}")
        return reply, values

    def _stopped(self) -> EngineError:
        code = self.proc.poll() if self.proc else None
        return EngineError(f"the MindSpore Lite step server stopped (exit code {code}); your conversation is kept and "
                           "the next message restarts it")

    def reset(self) -> None:
        """Start of a sequence: a dead (or just killed, not yet reaped) server is replaced by a new one."""
        if self._alive():
            try:
                self._call({"op": "reset"})
                return
            except EngineError:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._start()
        self._call({"op": "reset"})

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if not self._alive():
            raise self._stopped()
        names = list(inputs)
        _, values = self._call({"op": "run", "graph": graph, "names": names}, [inputs[n] for n in names])
        return values[0]

    def close(self) -> None:
        if self._alive():
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
