"""The AVX2 prompt kernels against the arithmetic they promise, in numpy."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest

from appliance.kernels.prompt_kernels import Int4Weight, PromptKernels, load, status
from appliance.model.numpy_ops import ARRAY
from appliance.model.quantize import quantize_blockwise


def _avx2_linux() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return platform.machine() == "x86_64" and " avx2" in flags and " fma" in flags


def test_kernel_is_built_where_it_can_run():
    """On Linux x86-64 with AVX2 (every CI machine) the install must have compiled it, or prompts silently slow."""
    if not _avx2_linux():
        pytest.skip("the kernel is for x86-64 Linux with AVX2 and FMA")
    assert load() is not None and status().startswith("loaded")


needs_kernel = pytest.mark.skipif(load() is None, reason="INT4 kernel not built or no AVX2 on this CPU")


def _emulated(x: np.ndarray, q) -> np.ndarray:
    """What the kernel computes: int8 activations per row and group, exact integer dots, fp32 scales."""
    groups = x.reshape(x.shape[0], -1, q.group_size)
    scale = np.abs(groups).max(-1) / 127
    codes = np.rint(groups / np.where(scale > 0, scale, 1)[..., None])
    weights = np.stack([q.packed & 15, q.packed >> 4], -1).reshape(q.n, -1, q.group_size).astype(np.float64) - 8
    dots = np.einsum("mbg,nbg->mnb", codes, weights)
    return np.einsum("mnb,mb,nb->mn", dots, scale, q.scales)


@needs_kernel
@pytest.mark.parametrize("rows, k, n, group", [(1, 256, 64, 32), (5, 512, 48, 64), (33, 1024, 96, 128),
                                               (7, 512, 32, 256), (128, 4096, 256, 128)])
def test_matches_the_int8_activation_arithmetic(rows, k, n, group):
    rng = np.random.default_rng(rows)
    q = quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32), 4, group)
    x = rng.standard_normal((rows, k)).astype(np.float32) * 3
    bias = rng.standard_normal(n).astype(np.float32)
    matmul = PromptKernels(load(), threads=2)
    got = matmul.matmul(matmul.quantize(x, group), Int4Weight(q.packed, q.scales, bias))
    assert got.shape == (rows, n)
    np.testing.assert_allclose(got, _emulated(x, q) + bias, rtol=1e-4, atol=1e-3)
    # and within the activation rounding of the exact product
    exact = x @ q.dequantize().T + bias
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.01


@needs_kernel
def test_one_thread_and_two_agree_and_zero_rows_stay_zero():
    rng = np.random.default_rng(1)
    q = quantize_blockwise(rng.standard_normal((64, 256)).astype(np.float32), 4, 128)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    x[2] = 0
    weight = Int4Weight(q.packed, q.scales)
    one, two = PromptKernels(load(), 1), PromptKernels(load(), 2)
    a, b = one.matmul(one.quantize(x, 128), weight), two.matmul(two.quantize(x, 128), weight)
    np.testing.assert_array_equal(a, b)
    assert not a[2].any()


@needs_kernel
def test_mismatched_or_unsupported_weights_are_refused():
    q = quantize_blockwise(np.ones((16, 256), np.float32), 4, 128)
    matmul = PromptKernels(load(), 1)
    with pytest.raises(ValueError, match="groups of 64 do not fit"):
        matmul.matmul(matmul.quantize(np.ones((2, 256), np.float32), 64), Int4Weight(q.packed, q.scales))
    odd = quantize_blockwise(np.ones((24, 256), np.float32), 4, 128)
    with pytest.raises(ValueError, match="multiple of 16"):
        matmul.matmul(matmul.quantize(np.ones((2, 256), np.float32), 128), Int4Weight(odd.packed, odd.scales))


@needs_kernel
def test_gelu_matches_the_tanh_formula_in_place():
    x = np.concatenate([np.linspace(-100, 100, 1001), np.random.default_rng(2).standard_normal(4093) * 4]).astype(np.float32)
    expected = ARRAY.gelu(x.astype(np.float64))
    kernels = PromptKernels(load(), 1)
    out = kernels.gelu(x)
    assert out is x
    np.testing.assert_allclose(x, expected, rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        kernels.gelu(np.ones((4, 4), np.float32)[:, ::2])
