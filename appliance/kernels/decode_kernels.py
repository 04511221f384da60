"""One-row INT4 matmuls (a decode step's GEMV) on MatMulNBits weights through ``prompt_kernels.c``.

Why: decode reads every weight once per token, so its speed is the rate the weights stream from memory. The C GEMV
walks each output column's contiguous bytes (prefetching ahead), with the columns split across threads, on AVX2 or
AVX-512 VNNI as ``native.path()`` chose; bench/kernels.py measures it against onnxruntime's MatMulNBits on the same
weights (docs/performance.md), and the engine's decode stays on onnxruntime where this is not faster.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from appliance.kernels.native import check, path
from appliance.kernels.prompt_kernels import Int4Weight, aligned, split

GEMV = {"avx2": "sc_int4_gemv", "avx512vnni": "sc_int4_gemv_avx512vnni"}


def fits(k: int, group: int) -> bool:
    """The shapes the GEMV handles (gemv_fits in the C file): K in 128-code chunks, groups of 32, 64 or n * 128."""
    return k > 0 and k % 128 == 0 and k % group == 0 and (group in (32, 64) or group % 128 == 0)


SHAPES = "rows of a multiple of 128 inputs in groups of 32, 64 or a multiple of 128"


@dataclass(frozen=True)
class QuantizedVector:
    """One activation row quantized per group of its weight, split to meet the low and high nibbles."""

    low: np.ndarray  # int8 [K/2]: x[0], x[2], ...
    high: np.ndarray  # int8 [K/2]: x[1], x[3], ...
    lane_scales: np.ndarray  # float32 [K/8]: the scale of each run of 8 inputs
    offsets: np.ndarray  # float32 [K/G]: 8 * scale * sum(codes) per group, the zero point's share
    group: int

    @property
    def k(self) -> int:
        return 2 * len(self.low)


class DecodeKernels:
    """``W x + b`` for one activation row; one instance per engine (it owns its thread pool)."""

    def __init__(self, lib: ctypes.CDLL, threads: int, kernel: str | None = None) -> None:
        """``kernel``: ``avx2`` or ``avx512vnni``; by default the path ``native.path()`` chose."""
        self.lib, self.threads, self.kernel = lib, max(1, threads), kernel or path()
        self.gemv = getattr(lib, GEMV[self.kernel])
        self.pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="int4-gemv") if self.threads > 1 else None

    def quantize(self, x: np.ndarray, group: int) -> QuantizedVector:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        k = len(x)
        if group <= 0 or not fits(k, group):
            raise ValueError(f"the GEMV takes {SHAPES}, not {k} in groups of {group}")
        low, high = aligned(k // 2, np.int8), aligned(k // 2, np.int8)
        lane_scales, offsets = np.empty(k // 8, np.float32), np.empty(k // group, np.float32)
        check(self.lib.sc_quantize_vector(x.ctypes.data, k, group, low.ctypes.data, high.ctypes.data,
                                          lane_scales.ctypes.data, offsets.ctypes.data), "sc_quantize_vector")
        return QuantizedVector(low, high, lane_scales, offsets, group)

    def matvec(self, x: QuantizedVector, weight: Int4Weight) -> np.ndarray:
        if not fits(weight.k, weight.group):
            raise ValueError(f"the GEMV takes {SHAPES}, not a {weight.n} x {weight.k} weight in groups of {weight.group}")
        if weight.group != x.group or weight.k != x.k:
            raise ValueError(f"an activation of {x.k} inputs in groups of {x.group} does not fit a {weight.n} x "
                             f"{weight.k} weight in groups of {weight.group}")
        y = np.empty(weight.n, np.float32)
        packed = np.ascontiguousarray(weight.packed)
        scales = np.ascontiguousarray(weight.scales, dtype=np.float32)

        def run(first: int, end: int, _part: int) -> None:
            check(self.gemv(x.low.ctypes.data, x.high.ctypes.data, x.lane_scales.ctypes.data, x.offsets.ctypes.data,
                            weight.k, weight.group, packed.ctypes.data, scales.ctypes.data, y.ctypes.data, first, end),
                  self.gemv.__name__)

        split(self.pool, self.threads, run, weight.n, 16)  # 16 columns: whole cache lines of y per thread
        if weight.bias is not None:
            y += weight.bias
        return y
