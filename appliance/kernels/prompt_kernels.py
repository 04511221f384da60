"""Prompt matmuls on INT4 MatMulNBits weights through the C kernel in ``prompt_kernels.c`` (x86-64 with AVX2).

``load()`` returns None where the kernel was not built or the CPU lacks AVX2/FMA; callers then keep onnxruntime's
prefill. The kernel runs with the GIL released, so a small thread pool splits the weight's columns.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np

from appliance.errors import EngineError

ROWS_PER_TILE = 4  # MR in the C file
COLUMNS_PER_PANEL = 16  # NR
_P, _I = ctypes.c_void_p, ctypes.c_int
# what the C entry points return instead of 0 when they refuse a call (the enum in prompt_kernels.c)
BAD_SHAPE, MISALIGNED, NO_AVX2 = 1, 2, 3
REFUSALS = {BAD_SHAPE: "a shape it does not handle", MISALIGNED: "a misaligned or missing buffer",
            NO_AVX2: "this CPU has no AVX2/FMA"}


@cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        from appliance.kernels import _prompt_kernels
    except ImportError:
        return None, "not built (no C compiler at install time, or not x86-64 Linux); prompts run in onnxruntime"
    lib = ctypes.CDLL(_prompt_kernels.__file__)
    if not lib.sc_kernels_supported():
        return None, "this CPU has no AVX2/FMA; prompts run in onnxruntime"
    lib.sc_quantize_rows.argtypes = [_P, _I, _I, _I, _P, _P, _P]
    lib.sc_int4_gemm.argtypes = [_P, _P, _P, _I, _I, _I, _P, _P, _P, _I, _I, _I, _P]
    lib.sc_gelu.argtypes = [_P, ctypes.c_size_t]
    for function in (lib.sc_quantize_rows, lib.sc_int4_gemm, lib.sc_gelu):
        function.restype = _I
    return lib, "loaded (AVX2 INT4 prompts)"


def check(code: int, function: str) -> None:
    """Raise the refusal a kernel entry point returned (``REFUSALS``); 0 is success."""
    if code:
        raise EngineError(f"the AVX2 prompt kernel refused a call to {function}: {REFUSALS.get(code, f'code {code}')} "
                          "(the Python side should have prevented it: please report this)")


def load() -> ctypes.CDLL | None:
    """The kernels, or None where they cannot run here (``status()`` says why)."""
    return _load()[0]


def status() -> str:
    return _load()[1]


@dataclass(frozen=True)
class Int4Weight:
    """One MatMulNBits matrix: ``packed`` uint8 [N, blocks, group/2] (codes 0..15, zero point 8), ``scales``
    float32 [N, blocks], optional ``bias`` [N]. The arrays may be views of a memory-mapped bundle."""

    packed: np.ndarray
    scales: np.ndarray
    bias: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def group(self) -> int:
        return self.packed.shape[2] * 2

    @property
    def k(self) -> int:
        return self.packed.shape[1] * self.group

    def supported(self) -> bool:
        """The shapes the kernel handles: columns in panels of 16, groups of whole 32-code runs."""
        return self.n % COLUMNS_PER_PANEL == 0 and self.group % 32 == 0 and self.group <= 256


@dataclass(frozen=True)
class QuantizedRows:
    """Activations quantized once per row and group, reusable for every matrix that reads them."""

    codes: np.ndarray  # int8, the kernel's tile layout
    scales: np.ndarray  # float32 [padded rows, blocks]
    offsets: np.ndarray  # float32 [padded rows, blocks]: 8 * scale * sum(codes), the zero point's share
    rows: int
    group: int


def _aligned(nbytes: int, dtype=np.uint8) -> np.ndarray:
    """A 64-byte aligned buffer (the kernel uses aligned AVX loads on its scratch and codes)."""
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype)


class PromptKernels:
    """``x @ W.T + b`` and GELU for prompt rows; one instance per engine (it owns per-thread scratch)."""

    def __init__(self, lib: ctypes.CDLL, threads: int) -> None:
        self.lib, self.threads = lib, max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="int4-gemm") if self.threads > 1 else None
        self.scratch: dict[tuple[int, int], list[np.ndarray]] = {}

    def quantize(self, x: np.ndarray, group: int) -> QuantizedRows:
        rows, k = x.shape
        padded = -(-rows // ROWS_PER_TILE) * ROWS_PER_TILE
        if padded != rows:
            x = np.concatenate([x, np.zeros((padded - rows, k), np.float32)])
        x = np.ascontiguousarray(x, dtype=np.float32)
        codes = _aligned(padded * k, np.int8)
        scales = np.empty((padded, k // group), np.float32)
        offsets = np.empty_like(scales)

        def run(first: int, end: int, _part: int) -> None:  # whole tiles: rows first.. have codes from first * k on
            check(self.lib.sc_quantize_rows(x[first].ctypes.data, end - first, k, group, codes[first * k:].ctypes.data,
                                            scales[first].ctypes.data, offsets[first].ctypes.data), "sc_quantize_rows")

        self._parallel(run, padded, ROWS_PER_TILE)
        return QuantizedRows(codes, scales, offsets, rows, group)

    def matmul(self, x: QuantizedRows, weight: Int4Weight) -> np.ndarray:
        if not weight.supported():
            raise ValueError(f"the kernel takes weights of N a multiple of {COLUMNS_PER_PANEL} and groups of 32..256, "
                             f"not {weight.n} x {weight.k} in groups of {weight.group}")
        if weight.group != x.group or weight.k != x.scales.shape[1] * x.group:
            raise ValueError(f"activations of {x.scales.shape[1] * x.group} inputs in groups of {x.group} do not fit "
                             f"a {weight.n} x {weight.k} weight in groups of {weight.group}")
        padded, n = x.scales.shape[0], weight.n
        y = np.empty((padded, n), np.float32)
        packed = np.ascontiguousarray(weight.packed)
        scales = np.ascontiguousarray(weight.scales, dtype=np.float32)
        scratch = self._scratch(weight.k, weight.group)

        def run(first: int, end: int, part: int) -> None:
            check(self.lib.sc_int4_gemm(x.codes.ctypes.data, x.scales.ctypes.data, x.offsets.ctypes.data, padded,
                                        weight.k, weight.group, packed.ctypes.data, scales.ctypes.data, y.ctypes.data, n,
                                        first, end, scratch[part].ctypes.data), "sc_int4_gemm")

        self._parallel(run, n, COLUMNS_PER_PANEL)
        y = y[:x.rows]
        if weight.bias is not None:
            y += weight.bias
        return y

    def _parallel(self, run: Callable[[int, int, int], None], total: int, unit: int) -> None:
        """``run(first, end, part)`` over ``total`` items split into one range per thread, in whole ``unit``s."""
        units = total // unit
        parts = max(1, min(self.threads, units))
        bounds = [unit * (units * i // parts) for i in range(parts + 1)]
        calls = [(bounds[i], bounds[i + 1], i) for i in range(parts)]
        if self.pool is None or parts == 1:
            for call in calls:
                run(*call)
        else:
            list(self.pool.map(lambda call: run(*call), calls))

    def gelu(self, x: np.ndarray) -> np.ndarray:
        """tanh GELU of a C-contiguous float32 array, in place (returned for chaining)."""
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError("gelu works in place on a C-contiguous float32 array")
        check(self.lib.sc_gelu(x.ctypes.data, x.size), "sc_gelu")
        return x

    def _scratch(self, k: int, group: int) -> list[np.ndarray]:
        key = (k, group)
        if key not in self.scratch:
            nbytes = k * COLUMNS_PER_PANEL + 4 * (k // group) * COLUMNS_PER_PANEL
            self.scratch[key] = [_aligned(nbytes) for _ in range(self.threads)]
        return self.scratch[key]
