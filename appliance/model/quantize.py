"""Weight-only, group-wise, symmetric round-to-nearest quantization into the MatMulNBits layout (``appliance.model.weights``).

A weight ``W [N, K]`` (out, in) is cut along K into groups of ``group_size`` (the last group zero-padded when K is not
a multiple), each group gets ``scale = max|w| / (2^(bits-1) - 1)`` and codes ``round(w / scale) + zero_point``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from appliance.model.numpy_ops import ARRAY
from appliance.model.weights import dequantize, pack_nibbles, zero_point

GROUP_SIZES = (32, 64, 128, 256)
BITS = {"int4": 4, "int8": 8}
CHUNK_ELEMENTS = 1 << 22  # elements quantized at a time: bounds each fp32 temporary to 16 MB whatever the shape


@dataclass
class BlockQuantized:
    """One matrix in MatMulNBits form."""

    packed: np.ndarray  # uint8 [N, blocks, blob]
    scales: np.ndarray  # float32 [N, blocks]
    n: int
    k: int
    bits: int
    group_size: int
    rel_error: float  # relative Frobenius error |W - dequant(Q)| / |W|

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    def dequantize(self) -> np.ndarray:
        """fp32 [N, K] as the runtime sees the weight."""
        return dequantize(ARRAY, self.packed, self.scales, self.bits, self.k, row_axes=1)


def effective_group(k: int, group_size: int) -> int:
    """The group size used for a matrix with ``k`` inputs: a group wider than K would only store padding."""
    return min(group_size, max(16, 1 << (k.bit_length() - 1)))


def quantize_blockwise(weight: np.ndarray, bits: int, group_size: int) -> BlockQuantized:
    """Quantize ``weight [N, K]`` (any float dtype, may be a memory map) a chunk of rows at a time."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    n, k = weight.shape
    blocks = -(-k // group_size)
    qmax = 2 ** (bits - 1) - 1
    packed = np.empty((n, blocks, group_size * bits // 8), dtype=np.uint8)
    scales = np.empty((n, blocks), dtype=np.float32)
    err = norm = 0.0
    chunk = max(1, CHUNK_ELEMENTS // (blocks * group_size))
    for start in range(0, n, chunk):
        rows = np.zeros((min(chunk, n - start), blocks * group_size), dtype=np.float32)
        rows[:, :k] = weight[start:start + rows.shape[0]]
        groups = rows.reshape(rows.shape[0], blocks, group_size)
        scale = np.abs(groups).max(axis=-1) / qmax
        scale[scale == 0] = 1.0
        ints = np.clip(np.rint(groups / scale[..., None]), -qmax, qmax)
        diff = groups - ints * scale[..., None]
        err, norm = err + float(np.vdot(diff, diff)), norm + float(np.vdot(groups, groups))
        codes = (ints + zero_point(bits)).astype(np.uint8)
        if bits == 4:
            codes = pack_nibbles(codes)
        packed[start:start + rows.shape[0]] = codes
        scales[start:start + rows.shape[0]] = scale
    return BlockQuantized(packed, scales, n, k, bits, group_size, (err / norm) ** 0.5 if norm else 0.0)
