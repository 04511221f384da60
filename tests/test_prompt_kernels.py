"""The C kernels against the arithmetic they promise, in numpy, on every path this CPU has; the dispatch among them."""

from __future__ import annotations

import errno
import platform
import signal
import threading
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import EngineError
from appliance.kernels import describe, native
from appliance.kernels.decode_kernels import PATH_NUMBERS, DecodeKernels
from appliance.kernels.prompt_kernels import Int4Weight, PromptKernels, aligned, load, split, status
from appliance.kernels.step_program import PackedLinear
from appliance.model.definition import MASK_FILL
from appliance.model.numpy_ops import ARRAY, layer_norm, softmax
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
    assert native.path() == best and status() == f"loaded ({best}: INT4 prompts, and the decode of bundles in groups of 128)"
    assert describe().startswith(f"{best} INT4 kernels for prompts and decode") and "chosen by CPUID" in describe()


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
        assert load() is None and status().endswith("prompts and decode run in onnxruntime")
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


def _packed(weight: Int4Weight) -> PackedLinear:
    return PackedLinear.of(weight, load())


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
    if group == 128:  # the decode GEMV's only group (other bundles decode in onnxruntime)
        decode = DecodeKernels(load(), 2, kernel)
        for row in range(len(x)):
            np.testing.assert_array_equal(decode.linear(x[row], _packed(weight)), want[row])


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("k, n", [(128, 4), (512, 36), (384, 24), (4096, 100), (16384, 48), (32768, 8)])
def test_decode_gemv_matches_the_int8_activation_arithmetic(kernel, k, n):
    rng = np.random.default_rng(k + n)
    q = quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32), 4, 128)
    x = rng.standard_normal(k).astype(np.float32) * 3
    bias = rng.standard_normal(n).astype(np.float32)
    gemv = DecodeKernels(load(), threads=2, kernel=kernel)
    got = gemv.linear(x, _packed(Int4Weight(q.packed, q.scales, bias)))
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
    assert not gemv.linear(x[2], _packed(weight)).any()


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
    with pytest.raises(ValueError, match="^a row of 192 inputs does not fit a 32 x 256 weight$"):
        gemv.linear(np.ones(192, np.float32), _packed(Int4Weight(q.packed, q.scales)))
    wide = quantize_blockwise(np.ones((16, 384), np.float32), 4, 96)
    with pytest.raises(ValueError, match="^a 16 x 384 weight in groups of 96 is not repacked: the step takes groups "
                                         "of 128 and columns in fours$"):
        _packed(Int4Weight(wide.packed, wide.scales))
    with pytest.raises(ValueError, match="and scales .* are not one MatMulNBits matrix"):
        _packed(Int4Weight(q.packed, q.scales[:-1]))
    with pytest.raises(ValueError, match="are not one MatMulNBits matrix"):
        gemv.logits(np.ones(256, np.float32), q.packed.view(np.int8), q.scales, 4)
    with pytest.raises(ValueError, match=r"a bias of shape \(31,\) does not fit 32 columns"):
        _packed(Int4Weight(q.packed, q.scales, np.ones(31, np.float32)))


@needs_kernel
def test_the_new_entry_points_return_error_codes():
    """Shapes and buffers the Python side never passes are refused in C, before any memory is touched."""
    lib = load()
    x, y = np.ones(256, np.float32), np.full(16, 7.0, np.float32)
    w, ws = aligned(16 * 128), np.ones((16, 2), np.float32)
    decode = DecodeKernels(lib, 2, "avx2")  # kept alive: the team is destroyed with it
    team = decode.team
    for name, number in PATH_NUMBERS.items():

        def call(k=256, n=16, w=w, number=number, handle=team):
            return lib.sc_team_linear(handle, number, x.ctypes.data, k, None if w is None else w.ctypes.data,
                                      ws.ctypes.data, None, y.ctypes.data, n)

        if name == "avx512vnni" and not _has("avx512vnni"):
            assert call() == native.NO_AVX512_VNNI
            continue
        for bad in ({"k": 192}, {"k": 0}, {"k": 128 * 257}, {"n": -1}, {"n": 14}, {"handle": None}):
            assert call(**bad) == native.BAD_SHAPE, (name, bad)
        assert call(w=None) == native.MISALIGNED
        assert call(w=w[1:]) == native.MISALIGNED  # the repacked codes are read 64 bytes aligned
        assert (y == 7.0).all()
    assert lib.sc_team_linear(team, 2, x.ctypes.data, 256, w.ctypes.data, ws.ctypes.data, None, y.ctypes.data,
                              16) == native.BAD_SHAPE  # no third path
    table, scales, logits = np.zeros((16, 256), np.uint8), np.ones((16, 2), np.float32), np.full(16, 7.0, np.float32)

    def head(bits=8, g=128, n0=0, n1=16, w=table):
        return lib.sc_nbits_gemv(x.ctypes.data, 256, g, bits, None if w is None else w.ctypes.data,
                                 scales.ctypes.data, logits.ctypes.data, n0, n1)

    for bad in ({"bits": 6}, {"g": 96}, {"g": 512}, {"n0": 4, "n1": 2}, {"n0": -1}):
        assert head(**bad) == native.BAD_SHAPE, bad
    assert head(w=None) == native.MISALIGNED
    assert (logits == 7.0).all()
    with pytest.raises(EngineError, match="refused a call to sc_team_linear: a shape it does not handle"):
        native.check(native.BAD_SHAPE, "sc_team_linear")


@pytest.mark.parametrize("threads, total, unit, pieces", [(1, 100, 8, 4), (2, 100, 8, 1), (2, 4096, 32, 4),
                                                           (2, 40, 16, 4), (3, 7, 1, 2)])
def test_split_covers_every_item_once_in_whole_units(threads, total, unit, pieces):
    """The ranges tile 0..total in whole units (the last one takes the remainder), each run by one thread, ``part``
    naming the thread (its scratch) and never more than ``threads`` of them."""
    from concurrent.futures import ThreadPoolExecutor

    seen, lock = [], threading.Lock()

    def run(first: int, end: int, part: int) -> None:
        with lock:
            seen.append((first, end, part))

    with ThreadPoolExecutor(max(1, threads - 1)) as pool:
        split(pool if threads > 1 else None, threads, run, total, unit, pieces)
    ranges = sorted((first, end) for first, end, _ in seen)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in pairwise(ranges))
    assert all(first % unit == 0 for first, _ in ranges)
    assert len(ranges) == min(total // unit, threads * pieces)
    assert {part for _, _, part in seen} <= set(range(threads))


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_logits_gemv_matches_the_dequantized_table(bits, group):
    """The prompt's logits: fp32 activations times the table's codes minus their zero point, scaled per group."""
    rng = np.random.default_rng(bits * group)
    q = quantize_blockwise(rng.standard_normal((301, 1024)).astype(np.float32), bits, group)
    x = rng.standard_normal(1024).astype(np.float32) * 3
    table = q.dequantize().astype(np.float64)
    got = PromptKernels(load(), 2).logits(x, q.packed, q.scales, bits)
    assert got.shape == (301,)
    assert (np.abs(got - table @ x) <= 1e-6 * (np.abs(table) @ np.abs(x)) + 1e-6).all()


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_logits_gemv_is_exact_on_integers_and_refuses_a_row_that_does_not_fit(bits):
    rng = np.random.default_rng(bits)
    packed = rng.integers(0, 256, size=(50, 8, 16 * bits), dtype=np.uint8)  # 1024 inputs in groups of 128
    wide = packed.astype(np.int64)
    codes = np.stack([wide & 15, wide >> 4], -1) - 8 if bits == 4 else wide - 128
    x = rng.integers(-60, 61, size=1024).astype(np.float32)
    kernels = PromptKernels(load(), 2)
    got = kernels.logits(x, packed, np.ones((50, 8), np.float32), bits)
    np.testing.assert_array_equal(got, codes.reshape(50, 1024) @ x.astype(np.int64))
    with pytest.raises(ValueError, match="a row of 512 inputs does not fit a 50 x 1024 matrix"):
        kernels.logits(x[:512], packed, np.ones((50, 8), np.float32), bits)


@needs_kernel
def test_layer_norm_matches_numpy_and_refuses_a_mismatched_weight():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((5, 3, 4096)) * 7 + 2).astype(np.float32)
    weight, bias = rng.standard_normal(4096).astype(np.float32), rng.standard_normal(4096).astype(np.float32)
    kernels = PromptKernels(load(), 2)
    got = kernels.layer_norm(x, weight, bias, 1e-5)
    want = layer_norm(x.astype(np.float64), weight, bias, 1e-5)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernels.layer_norm(x[0, 0], weight, bias, 1e-5), want[0, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="LayerNorm over 4096 values takes a weight and bias of 4096"):
        kernels.layer_norm(x, weight[:8], bias, 1e-5)
    lib = load()
    assert lib.sc_layer_norm(x.ctypes.data, 1, 4092, weight.ctypes.data, bias.ctypes.data, 1e-5,
                             got.ctypes.data) == native.BAD_SHAPE  # not whole vectors
    assert lib.sc_layer_norm(x.ctypes.data, 1, 4096, weight.ctypes.data, bias.ctypes.data, 0.0,
                             got.ctypes.data) == native.BAD_SHAPE  # no epsilon: a constant row would divide by zero
    assert lib.sc_layer_norm(x.ctypes.data, 1, 4096, None, bias.ctypes.data, 1e-5,
                             got.ctypes.data) == native.MISALIGNED


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_keys_land_in_the_cache_as_numpy_would_put_them(dtype):
    """A view inside a QKV projection [rows, heads, 3 * hd] into the cache's [heads, capacity, hd], rounded as numpy
    rounds (ties to even, overflow to inf) and nothing outside the rows written."""
    rng = np.random.default_rng(5)
    qkv = (rng.standard_normal((37, 6, 3 * 16)) * 300).astype(np.float32)
    qkv[0, 0, 16:20] = [65520.0, -1e6, 2.0 ** -26, 1 + 2.0 ** -11]  # overflow, underflow, a tie
    keys = qkv[:, :, 16:32]
    cache = np.full((1, 6, 64, 16), 7, dtype)
    PromptKernels(load(), 1).store_heads(keys, cache[0, :, 5:42])
    expected = np.full_like(cache, 7)
    with np.errstate(over="ignore"):  # 65520 and -1e6 become inf in fp16 on both sides
        expected[0, :, 5:42] = keys.transpose(1, 0, 2)
    np.testing.assert_array_equal(cache, expected)
    with pytest.raises(ValueError, match=r"keys of shape \(37, 6, 16\) do not fill a cache view of shape \(6, 36, 16\)"):
        PromptKernels(load(), 1).store_heads(keys, cache[0, :, 5:41])
    assert load().sc_heads_to_fp16(keys.ctypes.data, 37, 6, 12, 144, 48, cache.ctypes.data, 1024, 16) == native.BAD_SHAPE
    narrow = np.zeros((1, 6, 64, 12), dtype)  # heads of 12: numpy's copy, the same values
    with np.errstate(over="ignore"):
        PromptKernels(load(), 1).store_heads(keys[:, :, :12], narrow[0, :, :37])
        np.testing.assert_array_equal(narrow[0, :, :37], keys[:, :, :12].transpose(1, 0, 2).astype(dtype))


@needs_kernel
def test_gelu_matches_the_tanh_formula_in_place():
    x = np.concatenate([np.linspace(-100, 100, 1001), np.random.default_rng(2).standard_normal(4093) * 4]).astype(np.float32)
    expected = ARRAY.gelu(x.astype(np.float64))
    kernels = PromptKernels(load(), 2)  # two ranges, the second with the tail that is not a whole vector
    out = kernels.gelu(x)
    assert out is x
    np.testing.assert_allclose(x, expected, rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        kernels.gelu(np.ones((4, 4), np.float32)[:, ::2])


@needs_kernel
def test_gelu_of_extreme_values_is_the_same_in_every_lane():
    """NaN and infinities, and finite values whose exp overflows float32, give what the scalar tail and numpy's
    float32 formula give, whether they sit in a vector lane or the tail: a diverged activation is not turned into a
    plausible one."""
    special = np.array([np.nan, np.inf, -np.inf, -3e38, 3e38, -1e20, -200, 200], np.float32)
    x = np.concatenate([special, special[:5]])  # one vector, then a tail of 5
    with np.errstate(all="ignore"):
        expected = x / (1 + np.exp(np.float32(-2 * 0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))
    got = PromptKernels(load(), 1).gelu(x.copy())
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got[~np.isnan(got)], expected[~np.isnan(expected)], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got[:5], got[8:])


@needs_kernel
def test_cached_heads_widen_to_float32_exactly():
    """A group of heads' cached keys (a strided view of [heads, capacity, hd] fp16) as float32 [heads, rows, hd]: every
    half, infinities and subnormals included, is exactly a float; fp32 caches and heads of other widths go through
    numpy, with the same values."""
    rng = np.random.default_rng(11)
    cache = (rng.standard_normal((1, 6, 64, 16)) * 1000).astype(np.float16)
    cache[0, 1, 2, :4] = [np.inf, -np.inf, 2.0 ** -24, -0.0]
    kernels = PromptKernels(load(), 1)
    view = cache[0, 1:5, :37]
    got = kernels.widen_heads(view)
    assert got.dtype == np.float32 and got.shape == (4, 37, 16) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, view.astype(np.float32))
    assert np.signbit(got[0, 2, 3])
    wide = cache.astype(np.float32)[0, 1:5, :37]
    assert kernels.widen_heads(wide) is wide or np.shares_memory(kernels.widen_heads(wide), wide)
    np.testing.assert_array_equal(kernels.widen_heads(cache[0, :, :9, :12]), cache[0, :, :9, :12].astype(np.float32))
    raw = np.zeros(2 * 3 * 9 * 8 * 2 + 1, np.uint8)
    odd = np.ndarray((2, 3, 8), np.float16, raw, offset=1, strides=(9 * 8 * 2 + 1, 8 * 2, 2))  # odd byte strides
    odd[...] = view[:2, :3, :8]
    np.testing.assert_array_equal(kernels.widen_heads(odd), view[:2, :3, :8].astype(np.float32))
    assert kernels.widen_heads(np.ndarray((2, 0, 8), np.float16, raw, offset=1, strides=(16, 16, 2))).shape == (2, 0, 8)
    out = np.zeros(16, np.float32)
    assert load().sc_heads_to_fp32(view.ctypes.data, 1, 1, 12, 1024, 16, out.ctypes.data) == native.BAD_SHAPE
    assert load().sc_heads_to_fp32(view.ctypes.data, 1, 1, 8, 1024, 16, out.ctypes.data + 1) == native.MISALIGNED
    assert (out == 0).all()


@needs_kernel
@pytest.mark.parametrize("cols", [1, 7, 8, 37, 128])
def test_masked_softmax_is_the_definitions_fill_then_softmax(cols):
    """Masked scores become the fill, then each row its softmax, as ``np.copyto`` and numpy's softmax compute it: rows
    with nothing masked, a few, all but one, and all masked (the fill everywhere: uniform), for rows that are and are
    not whole vectors."""
    rng = np.random.default_rng(cols)
    heads, rows = 3, 5
    scores = (rng.standard_normal((heads, rows, cols)) * 20).astype(np.float32)
    mask = np.zeros((rows, cols + 3), bool)[:, :cols]  # a view: rows cols + 3 bytes apart
    mask[1, ::3] = True
    mask[2, 1:] = True
    mask[3] = True
    mask[4, -1] = True
    expected = scores.astype(np.float64)
    np.copyto(expected, MASK_FILL, where=mask[None])
    expected = softmax(expected)
    got = PromptKernels(load(), 1).masked_softmax(scores, mask, MASK_FILL)
    assert got is scores
    np.testing.assert_allclose(scores, expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(scores.sum(-1), 1, rtol=1e-6)
    assert (scores[:, 2, 1:] == 0).all()  # exp of the fill underflows: masked positions weigh exactly nothing
    with pytest.raises(ValueError, match="does not cover scores"):
        PromptKernels(load(), 1).masked_softmax(scores, mask[:, :-1], MASK_FILL)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        PromptKernels(load(), 1).masked_softmax(np.ones((2, 5, 2 * cols), np.float32)[:, :, ::2], mask, MASK_FILL)
    narrow = np.full(4, 7.0, np.float32)
    assert load().sc_masked_softmax(narrow.ctypes.data, 1, 1, 4, mask.ctypes.data, 3, 0.0) == native.BAD_SHAPE
    assert load().sc_masked_softmax(narrow.ctypes.data, 1, 1, 4, None, 4, 0.0) == native.MISALIGNED
    assert (narrow == 7.0).all()


@needs_kernel
@pytest.mark.parametrize("cols", [5, 8, 37])
def test_masked_softmax_of_nan_and_infinite_scores_is_numpys(cols):
    """A NaN score or +inf makes its row NaN and -inf weighs nothing, as in numpy's softmax (no clamp hides a
    diverged layer behind plausible weights); a broadcast mask (rows not laid out apart) is read as the same mask."""
    rng = np.random.default_rng(cols)
    scores = rng.standard_normal((2, 4, cols)).astype(np.float32)
    scores[:, 0, cols // 2] = np.nan
    scores[:, 1, cols - 1] = np.inf
    scores[:, 2, 0] = -np.inf
    row = np.zeros(cols, bool)
    row[1] = True
    mask = np.broadcast_to(row, (4, cols))
    expected = scores.astype(np.float64)
    np.copyto(expected, MASK_FILL, where=mask[None])
    with np.errstate(invalid="ignore"):
        expected = softmax(expected)
    got = PromptKernels(load(), 1).masked_softmax(scores, mask, MASK_FILL)
    assert np.isnan(got[:, :2]).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got[:, 2:], expected[:, 2:], rtol=2e-6, atol=1e-7)
    assert (got[:, 2:, 1] == 0).all() and (got[:, 2, 0] == 0).all()
    empty = np.zeros((2, 0, cols), np.float32)
    assert PromptKernels(load(), 1).masked_softmax(empty, np.zeros((0, cols), bool), MASK_FILL) is empty


def _attention_case(heads: int, hd: int, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((heads, hd)).astype(np.float32) * 0.3
    keys, values = (rng.standard_normal((heads, capacity, hd)).astype(np.float16) for _ in range(2))
    return q, keys, values


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("heads, hd, length", [(32, 128, 129), (3, 40, 7), (2, 8, 1), (4, 64, 2048), (2, 144, 9)])
def test_decode_attention_over_the_fp16_cache_matches_softmax_attention(kernel, heads, hd, length):
    """One query row per head against the first ``length`` cached positions, read as fp16 in place (head stride the
    cache's capacity), the heads taken by whichever of the team's threads is free: softmax(q . K) V within float
    rounding of a float64 reference (avx512vnni sums the values 16 columns to a vector where the head's width is a
    multiple of 16: 128 and 144, one pass and two)."""
    q, keys, values = _attention_case(heads, hd, length + 5, seed=hd + length)
    scores = np.einsum("hd,htd->ht", q.astype(np.float64), keys[:, :length].astype(np.float64))
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("ht,htd->hd", weights / weights.sum(-1, keepdims=True), values[:, :length].astype(np.float64))
    out = DecodeKernels(load(), 2, kernel).attend(q, keys, values, length)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)


@needs_kernel
def test_decode_attention_refuses_what_it_cannot_read():
    q, keys, values = _attention_case(2, 16, 4, seed=0)
    decode = DecodeKernels(load(), 2)
    lib, team, out, scratch = decode.lib, decode.team, np.full((2, 16), 7.0, np.float32), np.empty(8, np.float32)

    def call(heads=2, hd=16, stride=64, length=4, per_thread=4, q_at=q.ctypes.data, path=0):
        return lib.sc_team_attend(team, path, q_at, heads, hd, keys.ctypes.data, values.ctypes.data, stride, length,
                                  scratch.ctypes.data, per_thread, out.ctypes.data)

    for bad in ({"hd": 12}, {"length": 0}, {"stride": 48}, {"heads": -1}, {"per_thread": 3}, {"path": 2}):
        assert call(**bad) == native.BAD_SHAPE, bad
    assert call(q_at=q.ctypes.data + 2) == native.MISALIGNED
    assert (out == 7.0).all()
    with pytest.raises(ValueError, match="5 positions are not in them"):
        decode.attend(q, keys, values, 5)
    with pytest.raises(ValueError, match="do not fit fp16 caches"):
        decode.attend(q, keys.astype(np.float32), values, 4)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_the_decode_logits_are_the_prompt_logits(bits):
    """The decode step's logits (the team's rows 64 at a time) are the prompt path's logits, bit for bit, for every
    team size: the same fp32 arithmetic per row, whichever thread computes it."""
    rng = np.random.default_rng(bits)
    q = quantize_blockwise(rng.standard_normal((300, 256)).astype(np.float32), bits, 128)
    x = rng.standard_normal(256).astype(np.float32)
    want = PromptKernels(load(), 1).logits(x, q.packed, q.scales, bits)
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(DecodeKernels(load(), threads).logits(x, q.packed, q.scales, bits), want)
    with pytest.raises(ValueError, match="a row of 255 inputs does not fit a 300 x 256 matrix in groups of 128"):
        DecodeKernels(load(), 1).logits(x[:255], q.packed, q.scales, bits)


@needs_kernel
def test_the_team_takes_calls_from_several_threads_and_from_a_forked_child():
    """Python threads calling one team take turns (each gets its own right answer), and a child forked after the team
    started, which has the team's memory but not its threads, computes alone instead of waiting for them forever."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(7)
    q = quantize_blockwise(rng.standard_normal((512, 1024)).astype(np.float32), 4, 128)
    weight, rows = _packed(Int4Weight(q.packed, q.scales)), rng.standard_normal((12, 1024)).astype(np.float32)
    decode = DecodeKernels(load(), 2)
    want = [decode.linear(row, weight) for row in rows]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda row: decode.linear(row, weight), list(rows) * 5))
    for i, y in enumerate(got):
        np.testing.assert_array_equal(y, want[i % len(rows)])
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's status is the assertion
        signal.alarm(60)  # a child waiting for threads it does not have dies instead of hanging the suite
        os._exit(0 if np.array_equal(decode.linear(rows[0], weight), want[0]) else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
