"""The C kernels against the arithmetic they promise, in numpy, on every path this CPU has; the dispatch among them."""

from __future__ import annotations

import errno
import platform
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import EngineError
from appliance.kernels import describe, native
from appliance.kernels.decode_kernels import DecodeKernels
from appliance.kernels.prompt_kernels import Int4Weight, PromptKernels, load, status
from appliance.model.numpy_ops import ARRAY
from appliance.model.quantize import quantize_blockwise

FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
# the /proc/cpuinfo flags each path needs: the kernel's own CPUID check must agree with the OS's reading
NEEDS = {"avx2": {"avx2", "fma"}, "avx512vnni": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
         "avxvnni": {"avx_vnni"}, "amx": {"amx_tile", "amx_int8"}}


def _has(path: str) -> bool:
    return platform.machine() == "x86_64" and NEEDS[path] <= FLAGS


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    """Each test chooses the path again from its own environment (the choice is cached per process)."""
    monkeypatch.delenv(native.ENV, raising=False)
    native.choice.cache_clear()
    yield
    native.choice.cache_clear()


def test_kernel_is_built_where_it_can_run():
    """On Linux x86-64 with AVX2 (every CI machine) the install must have compiled it, or prompts silently slow."""
    if not _has("avx2"):
        pytest.skip("the kernel is for x86-64 Linux with AVX2 and FMA")
    assert load() is not None and status().startswith("loaded")


needs_kernel = pytest.mark.skipif(native.library() is None or not _has("avx2"),
                                  reason="kernels not built or no AVX2 on this CPU")


def _path(name: str):
    """A parameter for a kernel path, skipped with the reason where this CPU lacks it."""
    return pytest.param(name, marks=pytest.mark.skipif(not _has(name), reason=f"this CPU has no {name} "
                                                       f"({', '.join(sorted(NEEDS[name]))} in /proc/cpuinfo)"))


PATHS = [_path(name) for name in native.PATHS]


@needs_kernel
def test_cpuid_agrees_with_the_os():
    assert native.cpu_features() == [name for name in ("avx512vnni", "avx2", "avxvnni", "amx") if _has(name)]
    best = next(name for name in native.PATHS if _has(name))
    assert native.path() == best and status() == f"loaded ({best} INT4 prompts)"
    assert describe().startswith(f"{best} INT4 prompt kernel") and "chosen by CPUID" in describe()


@needs_kernel
def test_amx_permission_is_asked_only_where_there_is_amx():
    code = native.library().sc_request_amx()
    assert code == (0 if _has("amx") else errno.ENODEV)


@needs_kernel
@pytest.mark.parametrize("forced", [*PATHS, "onnxruntime"])
def test_the_environment_forces_a_path(monkeypatch, forced):
    monkeypatch.setenv(native.ENV, forced.upper())
    assert native.path() == forced
    assert f"forced by {native.ENV}" in describe()
    if forced == "onnxruntime":
        assert load() is None and status().endswith("prompts run in onnxruntime")
    else:
        assert load() is not None and PromptKernels(load(), 1).kernel == forced


@needs_kernel
def test_a_bad_or_unavailable_forced_path_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(native.ENV, "neon")
    with pytest.raises(EngineError, match=r"^STREAMCHAT_KERNEL='neon' is not a kernel path: use one of avx512vnni, "
                                          r"avx2, onnxruntime$"):
        load()
    assert describe().startswith("STREAMCHAT_KERNEL='neon' is not a kernel path")
    missing = [name for name in native.PATHS if not _has(name)]
    if not missing:
        pytest.skip("this CPU has every path: none can be forced where it is missing")
    monkeypatch.setenv(native.ENV, missing[0])
    native.choice.cache_clear()
    with pytest.raises(EngineError, match=f"{missing[0]} but this CPU lacks it"):
        load()


def _emulated(x: np.ndarray, q) -> np.ndarray:
    """What the kernels compute: int8 activations per row and group (x times 1/scale, rounded to even), exact integer
    dots with the codes minus their zero point 8, fp32 scales."""
    groups = x.reshape(x.shape[0], -1, q.group_size)
    scale = np.abs(groups).max(-1) / np.float32(127)
    codes = np.rint(groups * np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0)[..., None])
    weights = np.stack([q.packed & 15, q.packed >> 4], -1).reshape(q.n, -1, q.group_size).astype(np.int64) - 8
    dots = np.einsum("mbg,nbg->mnb", codes.astype(np.int64), weights)
    return np.einsum("mnb,mb,nb->mn", dots.astype(np.float64), scale, q.scales)


def _rounding(x: np.ndarray, q) -> np.ndarray:
    """What fp32 sums of these products may lose: 2e-6 of the sum of their magnitudes (cancellation leaves a small
    result next to large terms)."""
    return 2e-6 * (np.abs(x) @ np.abs(q.dequantize()).T)


def _integer_case(rows: int, k: int, n: int, group: int, seed: int):
    """Activations whose every group holds a 127 (scale exactly 1, codes the values themselves) and weight scales of
    1: the kernels' results are then sums of integer products below 2^24, exact in fp32."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-127, 128, size=(rows, k)).astype(np.float32)
    x[:, ::group] = 127
    packed = rng.integers(0, 256, size=(n, k // group, group // 2), dtype=np.uint8)
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, k).astype(np.int64) - 8
    return x, Int4Weight(packed, np.ones((n, k // group), np.float32)), x.astype(np.int64) @ codes.T


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("rows, k, n, group", [(1, 256, 64, 32), (5, 512, 96, 64), (33, 1024, 96, 128),
                                               (7, 512, 32, 256), (128, 4096, 256, 128)])
def test_prompt_gemm_matches_the_int8_activation_arithmetic(kernel, rows, k, n, group):
    rng = np.random.default_rng(rows)
    q = quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32), 4, group)
    x = rng.standard_normal((rows, k)).astype(np.float32) * 3
    bias = rng.standard_normal(n).astype(np.float32)
    matmul = PromptKernels(load(), threads=2, kernel=kernel)
    got = matmul.matmul(matmul.quantize(x, group), Int4Weight(q.packed, q.scales, bias))
    assert got.shape == (rows, n)
    assert (np.abs(got - _emulated(x, q) - bias) <= _rounding(x, q) + 1e-5).all()
    # and within the activation rounding of the exact product
    exact = x @ q.dequantize().T + bias
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.01


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_prompt_gemm_and_gemv_are_exact_on_integers(kernel, group):
    x, weight, want = _integer_case(6, 1024, 64, group, seed=group)
    prompt = PromptKernels(load(), 2, kernel)
    np.testing.assert_array_equal(prompt.matmul(prompt.quantize(x, group), weight), want)
    decode = DecodeKernels(load(), 2, kernel)
    for row in range(len(x)):
        np.testing.assert_array_equal(decode.matvec(decode.quantize(x[row], group), weight), want[row])


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("k, n, group", [(128, 16, 32), (256, 40, 64), (512, 33, 128), (1024, 64, 256),
                                         (4096, 100, 128), (16384, 48, 128)])
def test_decode_gemv_matches_the_int8_activation_arithmetic(kernel, k, n, group):
    rng = np.random.default_rng(k + n)
    q = quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32), 4, group)
    x = rng.standard_normal(k).astype(np.float32) * 3
    bias = rng.standard_normal(n).astype(np.float32)
    gemv = DecodeKernels(load(), threads=2, kernel=kernel)
    got = gemv.matvec(gemv.quantize(x, group), Int4Weight(q.packed, q.scales, bias))
    assert got.shape == (n,)
    assert (np.abs(got - _emulated(x[None], q)[0] - bias) <= _rounding(x, q) + 1e-5).all()


@needs_kernel
def test_the_paths_agree_with_each_other():
    """The prompt paths add the same integer dots in the same order, so they agree to the bit."""
    available = [name for name in native.PATHS if _has(name)]
    if len(available) < 2:
        pytest.skip(f"only {available} on this CPU: nothing to compare")
    rng = np.random.default_rng(3)
    q = quantize_blockwise(rng.standard_normal((96, 512)).astype(np.float32), 4, 128)
    x = rng.standard_normal((9, 512)).astype(np.float32)
    results = [k.matmul(k.quantize(x, 128), Int4Weight(q.packed, q.scales))
               for k in (PromptKernels(load(), 2, name) for name in available)]
    np.testing.assert_array_equal(results[0], results[1])


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
def test_one_thread_and_two_agree_and_zero_rows_stay_zero(kernel):
    rng = np.random.default_rng(1)
    q = quantize_blockwise(rng.standard_normal((64, 256)).astype(np.float32), 4, 128)
    x = rng.standard_normal((6, 256)).astype(np.float32)
    x[2] = 0
    weight = Int4Weight(q.packed, q.scales)
    one, two = PromptKernels(load(), 1, kernel), PromptKernels(load(), 2, kernel)
    a, b = one.matmul(one.quantize(x, 128), weight), two.matmul(two.quantize(x, 128), weight)
    np.testing.assert_array_equal(a, b)
    assert not a[2].any()
    gemv = DecodeKernels(load(), 2, kernel)
    assert not gemv.matvec(gemv.quantize(x[2], 128), weight).any()


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
def test_mismatched_or_unsupported_weights_are_refused(kernel):
    q = quantize_blockwise(np.ones((32, 256), np.float32), 4, 128)
    matmul = PromptKernels(load(), 1, kernel)
    with pytest.raises(ValueError, match="groups of 64 do not fit"):
        matmul.matmul(matmul.quantize(np.ones((2, 256), np.float32), 64), Int4Weight(q.packed, q.scales))
    odd = quantize_blockwise(np.ones((24, 256), np.float32), 4, 128)
    with pytest.raises(ValueError, match=f"the {kernel} kernel takes weights of N a multiple of "
                                         f"{matmul.columns_per_panel}"):
        matmul.matmul(matmul.quantize(np.ones((2, 256), np.float32), 128), Int4Weight(odd.packed, odd.scales))
    gemv = DecodeKernels(load(), 1, kernel)
    with pytest.raises(ValueError, match="^the GEMV takes rows of a multiple of 128 inputs .*, not 192 in groups of 64$"):
        gemv.quantize(np.ones(192, np.float32), 64)
    with pytest.raises(ValueError, match="does not fit a 32 x 256 weight in groups of 128"):
        gemv.matvec(gemv.quantize(np.ones(256, np.float32), 64), Int4Weight(q.packed, q.scales))
    wide = quantize_blockwise(np.ones((16, 384), np.float32), 4, 96)
    with pytest.raises(ValueError, match="not a 16 x 384 weight in groups of 96"):
        gemv.matvec(gemv.quantize(np.ones(384, np.float32), 128), Int4Weight(wide.packed, wide.scales))


@needs_kernel
def test_the_new_entry_points_return_error_codes():
    """Shapes and buffers the Python side never passes are refused in C, before any memory is touched."""
    lib = load()
    x, y = np.ones(256, np.float32), np.full(16, 7.0, np.float32)
    lo, hi, lanes, offsets = np.zeros(128, np.int8), np.zeros(128, np.int8), np.zeros(32, np.float32), np.zeros(2, np.float32)
    w, ws = np.zeros((16, 128), np.uint8), np.ones((16, 2), np.float32)
    assert lib.sc_quantize_vector(x.ctypes.data, 192, 64, lo.ctypes.data, hi.ctypes.data, lanes.ctypes.data,
                                  offsets.ctypes.data) == native.BAD_SHAPE
    assert lib.sc_quantize_vector(x.ctypes.data + 2, 256, 128, lo.ctypes.data, hi.ctypes.data, lanes.ctypes.data,
                                  offsets.ctypes.data) == native.MISALIGNED
    for name in ("sc_int4_gemv", "sc_int4_gemv_avx512vnni"):
        gemv = getattr(lib, name)

        def call(k=256, g=128, n0=0, n1=16, w=w, gemv=gemv):
            return gemv(lo.ctypes.data, hi.ctypes.data, lanes.ctypes.data, offsets.ctypes.data, k, g,
                        None if w is None else w.ctypes.data, ws.ctypes.data, y.ctypes.data, n0, n1)

        if name.endswith("avx512vnni") and not _has("avx512vnni"):
            assert call() == native.NO_AVX512_VNNI
            continue
        for bad in ({"k": 192}, {"g": 96}, {"g": 0}, {"n0": 4, "n1": 2}, {"n0": -1}):
            assert call(**bad) == native.BAD_SHAPE, (name, bad)
        assert call(w=None) == native.MISALIGNED
        assert (y == 7.0).all()
    with pytest.raises(EngineError, match="refused a call to sc_int4_gemv: a shape it does not handle"):
        native.check(native.BAD_SHAPE, "sc_int4_gemv")


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
