"""Weight-only, group-wise, symmetric round-to-nearest quantization in onnxruntime's MatMulNBits layout.

A weight ``W [N, K]`` (out, in) is cut along K into groups of ``group_size`` (the last group zero-padded when K is not
a multiple), each group gets ``scale = max|w| / (2^(bits-1) - 1)`` and codes ``round(w / scale) + 2^(bits-1)``, so the
implicit zero point is 8 (INT4) or 128 (INT8) and ``w ~ (code - zp) * scale``. INT4 codes are packed two per byte,
low nibble first: ``B [N, blocks, group_size * bits / 8]`` uint8, ``scales [N, blocks]`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from appliance.kernels.prompt_kernels import unpack_codes

WEIGHT_QUANTS = ("int4", "int8", "fp16", "fp32")
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
        codes = unpack_codes(self.packed, self.bits).astype(np.float32) - 2 ** (self.bits - 1)
        return (codes * self.scales[..., None]).reshape(self.n, -1)[:, : self.k]


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
        codes = (ints + 2 ** (bits - 1)).astype(np.uint8)
        if bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        packed[start:start + rows.shape[0]] = codes
        scales[start:start + rows.shape[0]] = scale
    return BlockQuantized(packed, scales, n, k, bits, group_size, (err / norm) ** 0.5 if norm else 0.0)
