"""A decode step's kernels on a thread team: recorded steps (``step_program``), and each of their parts on its own for
tests and benchmarks: ``W x + b`` on repacked INT4 weights, attention over the fp16 KV cache, the logits of a 4- or
8-bit lm_head.

Why: decode reads every weight once per token, so its speed is the rate the weights stream from memory. The GEMV reads
four columns per stream, AVX2 or AVX-512 VNNI as ``native.path()`` chose; the team (in ``prompt_kernels.c``) runs each
job on every thread, the columns or heads taken a few at a time from a shared counter, and a recorded step runs all of
its jobs in one call. bench/kernels.py measures the GEMV against onnxruntime's MatMulNBits on the same weights and
bench/decode_step.py the engine's step against onnxruntime's decode (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np

from appliance.errors import EngineError
from appliance.kernels.native import check, path
from appliance.kernels.prompt_kernels import logits_operands

if TYPE_CHECKING:
    from appliance.kernels.step_program import PackedLinear, StepProgram

PATH_NUMBERS = {"avx2": 0, "avx512vnni": 1}  # the path argument of sc_team_linear and sc_step_run


class DecodeKernels:
    """A decode step's kernels on one thread team (its threads live as long as the instance): the kernel decoder's
    (``engines/kernel_decode.py``), or a test's or benchmark's. The team runs one job at a time: calls from several
    Python threads take turns."""

    def __init__(self, lib: ctypes.CDLL, threads: int, kernel: str | None = None) -> None:
        """``kernel``: ``avx2`` or ``avx512vnni``; by default the path ``native.path()`` chose."""
        self.lib, self.kernel = lib, kernel or path()
        self.team = lib.sc_team_create(max(1, threads))
        if not self.team:
            raise EngineError(f"could not make a team of {threads} threads for the CPU kernels (1 to 256 threads, and "
                              "the memory and threads to start them)")
        self.turn = threading.Lock()  # one job at a time on the team, and none while it is destroyed
        weakref.finalize(self, _destroy, lib, self.team, self.turn)
        self.threads = lib.sc_team_threads(self.team)
        self.scratch = np.empty(0, np.float32)  # attention scores, one row per thread

    def linear(self, x: np.ndarray, weight: PackedLinear) -> np.ndarray:
        """``W x + b`` for one row ``x`` [K] on a repacked matrix, its activations quantized per group of 128 to int8
        (as onnxruntime's accuracy level 4 does): the GEMV a recorded step runs, on its own."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        if x.size != weight.k:
            raise ValueError(f"a row of {x.size} inputs does not fit a {weight.n} x {weight.k} weight")
        y = np.empty(weight.n, np.float32)
        with self.turn:
            code = self.lib.sc_team_linear(self.team, PATH_NUMBERS[self.kernel], x.ctypes.data, weight.k,
                                           weight.codes.ctypes.data, weight.scales.ctypes.data,
                                           None if weight.bias is None else weight.bias.ctypes.data, y.ctypes.data,
                                           weight.n)
        check(code, "sc_team_linear")
        return y

    def attend(self, queries: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int) -> np.ndarray:
        """softmax(q . K) V per head for one query row ``queries`` [heads, hd] (fp32, already scaled) over the first
        ``length`` positions of the cache ``keys``/``values`` [heads, capacity, hd] (fp16, read in place)."""
        heads, hd = queries.shape
        if (keys.dtype != np.float16 or values.dtype != np.float16 or keys.shape != values.shape
                or keys.strides != values.strides or keys.shape[0] != heads or keys.shape[2] != hd
                or keys.strides[1:] != (2 * hd, 2) or not 0 < length <= keys.shape[1]):
            raise ValueError(f"queries {queries.shape} do not fit fp16 caches of shape {keys.shape} rows of "
                             f"{hd} apart, or {length} positions are not in them")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        out = np.empty_like(queries)
        with self.turn:
            if self.scratch.size < self.threads * length:
                self.scratch = np.empty(self.threads * keys.shape[1], np.float32)
            code = self.lib.sc_team_attend(self.team, PATH_NUMBERS[self.kernel], queries.ctypes.data, heads, hd,
                                           keys.ctypes.data,
                                           values.ctypes.data, keys.strides[0] // 2, length, self.scratch.ctypes.data,
                                           self.scratch.size // self.threads, out.ctypes.data)
        check(code, "sc_team_attend")
        return out

    def logits(self, x: np.ndarray, packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
        """``W x`` in fp32 for one row ``x`` [K] and a 4- or 8-bit MatMulNBits matrix (``packed`` uint8 [N, blocks,
        group * bits / 8], ``scales`` [N, blocks]): the logits."""
        x, packed, scales, group = logits_operands(x, packed, scales, bits)
        n = len(packed)
        y = np.empty(n, np.float32)
        with self.turn:
            code = self.lib.sc_team_logits(self.team, x.ctypes.data, x.size, group, bits, packed.ctypes.data,
                                           scales.ctypes.data, y.ctypes.data, n)
        check(code, "sc_team_logits")
        return y


    def run(self, program: StepProgram, past: int) -> None:
        """A recorded decode step (``step_program``) for the token after ``past`` cached positions: its logits land
        in ``program.output``."""
        with self.turn:
            code = self.lib.sc_step_run(self.team, PATH_NUMBERS[self.kernel], program.code.ctypes.data,
                                        len(program.code), program.arena.ctypes.data, program.arena.size, past)
        check(code, "sc_step_run")


def _destroy(lib: ctypes.CDLL, team: int, turn: threading.Lock) -> None:
    """Stop the team's threads once no call runs on it; at interpreter exit a call still running on a daemon thread
    keeps the lock, and the team is left to the process's end rather than freed under it."""
    if turn.acquire(timeout=1):
        lib.sc_team_destroy(team)
