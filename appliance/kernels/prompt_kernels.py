"""Prompt matmuls on INT4 MatMulNBits weights, and the last row's logits, through the C kernels in
``prompt_kernels.c`` (x86-64: AVX2 or AVX-512 VNNI, whichever ``native.path()`` chose).

``load()`` returns None where the kernel was not built, the CPU lacks AVX2/FMA or ``STREAMCHAT_KERNEL=onnxruntime``;
callers then keep onnxruntime's prefill. The kernel runs with the GIL released, so a small thread pool splits the
weight's columns.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from appliance.errors import EngineError
from appliance.kernels.native import BAD_SHAPE, MISALIGNED, NO_AVX2, ONNXRUNTIME, check, choice, load, path

__all__ = ["BAD_SHAPE", "MISALIGNED", "NO_AVX2", "Int4Weight", "PromptKernels", "QuantizedRows", "aligned", "check",
           "groups_fit", "load", "logits_operands", "split", "status"]

ROWS_PER_TILE = 4  # MR in the C file
PIECES = 4  # column ranges per thread in a matmul: with another process on one core, 4-6% faster than one range each
# weight columns per panel (NR, NR512 in the C file) and the GEMM entry point, per path
PANELS = {"avx2": (16, "sc_int4_gemm"), "avx512vnni": (32, "sc_int4_gemm_avx512vnni")}


def status() -> str:
    """The kernels' state in a few words: which path, or why prompts and decode run in onnxruntime."""
    try:
        chosen, why = choice()
    except EngineError as exc:  # a bad STREAMCHAT_KERNEL: the text says which
        return str(exc)
    if chosen == ONNXRUNTIME:
        return f"{why}; prompts and decode run in onnxruntime"
    return f"loaded ({chosen}: INT4 prompts, and the decode of bundles in groups of 128)"


def groups_fit(k: int, group: int) -> bool:
    """The blocking every prompt kernel takes (groups_fit in the C file): K in whole groups of 32..256, a multiple of
    32."""
    return 32 <= group <= 256 and group % 32 == 0 and k >= group and k % group == 0


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

    def supported(self, columns_per_panel: int) -> bool:
        """The shapes the kernel handles: columns in whole panels, groups of whole 32-code runs."""
        return self.n % columns_per_panel == 0 and groups_fit(self.k, self.group)

    def operands(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """codes, scales and bias as the C kernels read them (contiguous, float32), their sizes checked: C sees
        pointers only."""
        packed, scales = matrix_operands(self.packed, self.scales)
        bias = None if self.bias is None else np.ascontiguousarray(self.bias, dtype=np.float32)
        if bias is not None and bias.shape != (self.n,):
            raise ValueError(f"a bias of shape {bias.shape} does not fit {self.n} columns")
        return packed, scales, bias


@dataclass(frozen=True)
class QuantizedRows:
    """Activations quantized once per row and group, reusable for every matrix that reads them."""

    codes: np.ndarray  # int8, the kernel's tile layout
    scales: np.ndarray  # float32 [padded rows, blocks]
    offsets: np.ndarray  # float32 [padded rows, blocks]: 8 * scale * sum(codes), the zero point's share
    rows: int
    group: int


def logits_operands(x: np.ndarray, packed: np.ndarray, scales: np.ndarray,
                    bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One row ``x`` and a 4- or 8-bit MatMulNBits matrix (``packed`` uint8 [N, blocks, group * bits / 8], ``scales``
    one float32 per column and block) as the logits GEMV reads them, and the group; C sees pointers only, so every
    shape is checked here."""
    n, blocks, blob = packed.shape
    k, group = blocks * blob * 8 // bits, blob * 8 // bits
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if x.size != k or not groups_fit(k, group):
        raise ValueError(f"a row of {x.size} inputs does not fit a {n} x {k} matrix in groups of {group}")
    return x, *matrix_operands(packed, scales), group


def matrix_operands(packed: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A MatMulNBits matrix as the C code reads it: uint8 codes [N, blocks, bytes per block] and one float32 scale per
    column and block."""
    if packed.dtype != np.uint8 or packed.ndim != 3 or scales.size != packed.shape[0] * packed.shape[1]:
        raise ValueError(f"codes {packed.dtype} {packed.shape} and scales {scales.shape} are not one MatMulNBits matrix")
    return np.ascontiguousarray(packed), np.ascontiguousarray(scales, dtype=np.float32)


def aligned(nbytes: int, dtype=np.uint8) -> np.ndarray:
    """A 64-byte aligned buffer (the kernels use aligned AVX loads on their scratch and codes)."""
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype)


def split(pool: ThreadPoolExecutor | None, threads: int, run: Callable[[int, int, int], None], total: int,
          unit: int, pieces: int = 1) -> None:
    """``run(first, end, part)`` over ``total`` items in whole ``unit``s (the last range also takes any remainder),
    cut into ``pieces`` ranges per thread that the threads take in turn as each finishes its previous one: with more
    than one piece a thread slowed by the machine (another process on its core) does less of the work instead of
    holding up the call. ``part`` is the thread's index (its scratch); the calling thread is part 0 (one hand-off
    fewer per call)."""
    units = total // unit
    parts = max(1, min(threads, units)) if pool is not None else 1
    count = max(1, min(units, parts * pieces))
    bounds = [unit * (units * i // count) for i in range(count)] + [total]
    ranges = iter(range(count))  # shared: each next() hands one range to one thread

    def work(part: int) -> None:
        for i in ranges:
            run(bounds[i], bounds[i + 1], part)

    others = [pool.submit(work, part) for part in range(1, parts)] if pool is not None else []
    work(0)
    for future in others:
        future.result()


class PromptKernels:
    """``x @ W.T + b``, LayerNorm, GELU, cache writes and the logits for prompt rows; one instance per engine (it owns
    per-thread scratch)."""

    def __init__(self, lib: ctypes.CDLL, threads: int, kernel: str | None = None) -> None:
        """``kernel``: ``avx2`` or ``avx512vnni``; by default the path ``native.path()`` chose."""
        self.lib, self.threads, self.kernel = lib, max(1, threads), kernel or path()
        self.columns_per_panel, entry = PANELS[self.kernel]
        self.gemm = getattr(lib, entry)
        self.pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="int4-gemm") if self.threads > 1 else None
        self.scratch: dict[tuple[int, int], list[np.ndarray]] = {}

    def quantize(self, x: np.ndarray, group: int) -> QuantizedRows:
        rows, k = x.shape
        padded = -(-rows // ROWS_PER_TILE) * ROWS_PER_TILE
        if padded != rows:
            x = np.concatenate([x, np.zeros((padded - rows, k), np.float32)])
        x = np.ascontiguousarray(x, dtype=np.float32)
        codes = aligned(padded * k, np.int8)
        scales = np.empty((padded, k // group), np.float32)
        offsets = np.empty_like(scales)

        def run(first: int, end: int, _part: int) -> None:  # whole tiles: rows first.. have codes from first * k on
            check(self.lib.sc_quantize_rows(x[first].ctypes.data, end - first, k, group, codes[first * k:].ctypes.data,
                                            scales[first].ctypes.data, offsets[first].ctypes.data), "sc_quantize_rows")

        split(self.pool, self.threads, run, padded, ROWS_PER_TILE)
        return QuantizedRows(codes, scales, offsets, rows, group)

    def matmul(self, x: QuantizedRows, weight: Int4Weight) -> np.ndarray:
        if not weight.supported(self.columns_per_panel):
            raise ValueError(f"the {self.kernel} kernel takes weights of N a multiple of {self.columns_per_panel} and "
                             "groups of 32..256, "
                             f"not {weight.n} x {weight.k} in groups of {weight.group}")
        if weight.group != x.group or weight.k != x.scales.shape[1] * x.group:
            raise ValueError(f"activations of {x.scales.shape[1] * x.group} inputs in groups of {x.group} do not fit "
                             f"a {weight.n} x {weight.k} weight in groups of {weight.group}")
        padded, n = x.scales.shape[0], weight.n
        y = np.empty((padded, n), np.float32)
        packed, scales, bias = weight.operands()
        scratch = self._scratch(weight.k, weight.group)

        def run(first: int, end: int, part: int) -> None:
            check(self.gemm(x.codes.ctypes.data, x.scales.ctypes.data, x.offsets.ctypes.data, padded, weight.k,
                            weight.group, packed.ctypes.data, scales.ctypes.data, None if bias is None else bias.ctypes.data,
                            y.ctypes.data, n, first, end, scratch[part].ctypes.data), self.gemm.__name__)

        split(self.pool, self.threads, run, n, self.columns_per_panel, PIECES)
        return y[:x.rows]

    def logits(self, x: np.ndarray, packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
        """``W x`` in fp32 for one row ``x`` [K] and a 4- or 8-bit MatMulNBits matrix (``packed`` uint8 [N, blocks,
        group * bits / 8], ``scales`` [N, blocks]; the lm_head, which may be a memory map): the logits of a prompt's
        last row, the columns split across the threads."""
        x, packed, scales, group = logits_operands(x, packed, scales, bits)
        y = np.empty(len(packed), np.float32)

        def run(first: int, end: int, _part: int) -> None:
            check(self.lib.sc_nbits_gemv(x.ctypes.data, x.size, group, bits, packed.ctypes.data, scales.ctypes.data,
                                         y.ctypes.data, first, end), "sc_nbits_gemv")

        split(self.pool, self.threads, run, len(packed), 1)
        return y

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
        """LayerNorm over the last axis of ``x`` (rows of a multiple of 8 values) into a new fp32 array, in one C pass
        per row where numpy makes several over temporaries, the rows split across the threads."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        weight, bias = (np.ascontiguousarray(t, dtype=np.float32) for t in (weight, bias))
        out = np.empty_like(x)
        k = x.shape[-1]
        if weight.shape != (k,) or bias.shape != (k,):
            raise ValueError(f"LayerNorm over {k} values takes a weight and bias of {k}, not {weight.shape} and {bias.shape}")

        def run(first: int, end: int, _part: int) -> None:  # rows first..end
            check(self.lib.sc_layer_norm(x.ctypes.data + 4 * k * first, end - first, k, weight.ctypes.data,
                                         bias.ctypes.data, eps, out.ctypes.data + 4 * k * first), "sc_layer_norm")

        split(self.pool, self.threads, run, x.size // k, 1)
        return out

    def store_heads(self, values: np.ndarray, cache: np.ndarray) -> None:
        """``cache[h, r] = values[r, h]``: a prompt's keys or values [rows, heads, hd] (any strides) into a cache view
        [heads, rows, hd]; fp16 caches contiguous along hd, hd a multiple of 8, in one C pass, others by numpy."""
        rows, heads, hd = values.shape
        if cache.shape != (heads, rows, hd):
            raise ValueError(f"keys of shape {values.shape} do not fill a cache view of shape {cache.shape}")
        if (cache.dtype != np.float16 or values.dtype != np.float32 or values.strides[2] != 4 or cache.strides[2] != 2
                or hd % 8):  # the C loop converts 8 values at a time
            cache[...] = values.transpose(1, 0, 2)
            return
        check(self.lib.sc_heads_to_fp16(values.ctypes.data, rows, heads, hd, values.strides[0] // 4,
                                        values.strides[1] // 4, cache.ctypes.data, cache.strides[0] // 2,
                                        cache.strides[1] // 2), "sc_heads_to_fp16")

    def widen_heads(self, cached: np.ndarray) -> np.ndarray:
        """A cache view [heads, rows, hd] as float32 [heads, rows, hd]: an fp16 view contiguous along hd (hd a multiple
        of 8) with whole-element strides widened in one C pass, anything else by numpy (an fp32 view comes back as it
        is)."""
        heads, rows, hd = cached.shape
        if (cached.dtype != np.float16 or not cached.flags.aligned or cached.strides[2] != 2 or hd % 8
                or not cached.size):  # numpy calls any empty array aligned
            return np.asarray(cached, np.float32)
        out = np.empty(cached.shape, np.float32)
        check(self.lib.sc_heads_to_fp32(cached.ctypes.data, heads, rows, hd, cached.strides[0] // 2,
                                        cached.strides[1] // 2, out.ctypes.data), "sc_heads_to_fp32")
        return out

    def masked_softmax(self, scores: np.ndarray, mask: np.ndarray, fill: float) -> np.ndarray:
        """In place over the last axis of ``scores`` [heads, rows, cols] (C-contiguous float32): the scores where
        ``mask`` [rows, cols] (bool, shared by the heads) is True become ``fill``, then each row its softmax; returned
        for chaining. A mask whose rows are not laid out one after another (broadcast, reversed) is copied first."""
        heads, rows, cols = scores.shape
        if scores.dtype != np.float32 or not scores.flags.c_contiguous:
            raise ValueError("masked_softmax works in place on a C-contiguous float32 array")
        if mask.shape != (rows, cols) or mask.dtype != np.bool_:
            raise ValueError(f"a mask of {mask.dtype} {mask.shape} does not cover scores of {rows} x {cols}")
        if not scores.size:
            return scores
        if mask.strides[1] != 1 or mask.strides[0] < cols:
            mask = np.ascontiguousarray(mask)
        check(self.lib.sc_masked_softmax(scores.ctypes.data, heads, rows, cols, mask.ctypes.data, mask.strides[0],
                                         fill), "sc_masked_softmax")
        return scores

    def gelu(self, x: np.ndarray) -> np.ndarray:
        """tanh GELU of a C-contiguous float32 array, in place (returned for chaining), split across the threads."""
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError("gelu works in place on a C-contiguous float32 array")

        def run(first: int, end: int, _part: int) -> None:
            check(self.lib.sc_gelu(x.ctypes.data + 4 * first, end - first), "sc_gelu")

        split(self.pool, self.threads, run, x.size, 16)  # 16 values: whole cache lines per thread
        return x

    def _scratch(self, k: int, group: int) -> list[np.ndarray]:
        key = (k, group)
        if key not in self.scratch:
            nbytes = (k + 4 * (k // group)) * self.columns_per_panel
            self.scratch[key] = [aligned(nbytes) for _ in range(self.threads)]
        return self.scratch[key]
