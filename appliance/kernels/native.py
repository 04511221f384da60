"""The compiled kernels (``prompt_kernels.c``) and which of their paths runs on this CPU.

Why here: users' processors differ (AVX2 laptops, AVX-512 VNNI servers and Zen 4/5, ARM), so the path is chosen at run
time from CPUID, once per process, and every caller asks this module. ``STREAMCHAT_KERNEL`` forces a path for testing
(``avx2``, ``avx512vnni`` or ``onnxruntime``: no own kernel at all); a forced path this CPU lacks, or an unknown name,
is an EngineError at load, never a silent fallback that would test something else.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

from appliance.errors import EngineError

ENV = "STREAMCHAT_KERNEL"
ONNXRUNTIME = "onnxruntime"
# path name -> the CPU feature bit it needs (SC_CPU_* in prompt_kernels.c), best first
PATHS = {"avx512vnni": 2, "avx2": 1}
AVX_VNNI, AMX_INT8 = 4, 8  # detected and reported; no kernel uses them yet (docs/performance.md)
# what the C entry points return instead of 0 when they refuse a call (the enum in prompt_kernels.c)
BAD_SHAPE, MISALIGNED, NO_AVX2, NO_AVX512_VNNI, NO_MEMORY = 1, 2, 3, 4, 5
REFUSALS = {BAD_SHAPE: "a shape it does not handle", MISALIGNED: "a misaligned or missing buffer",
            NO_AVX2: "this CPU has no AVX2/FMA", NO_AVX512_VNNI: "this CPU has no AVX-512 VNNI",
            NO_MEMORY: "no memory for its scratch"}
_P, _I = ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "sc_quantize_rows": [_P, _I, _I, _I, _P, _P, _P],
    "sc_int4_gemm": [_P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _I, _I, _I, _P],
    "sc_int4_gemm_avx512vnni": [_P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _I, _I, _I, _P],
    "sc_nbits_gemv": [_P, _I, _I, _I, _P, _P, _P, _I, _I],
    "sc_layer_norm": [_P, _I, _I, _P, _P, ctypes.c_float, _P],
    "sc_heads_to_fp16": [_P, _I, _I, _I, ctypes.c_long, ctypes.c_long, _P, ctypes.c_long, ctypes.c_long],
    "sc_heads_to_fp32": [_P, _I, _I, _I, ctypes.c_long, ctypes.c_long, _P],
    "sc_masked_softmax": [_P, _I, _I, _I, _P, ctypes.c_long, ctypes.c_float],
    "sc_gelu": [_P, ctypes.c_size_t],
    "sc_team_threads": [_P],
    "sc_team_linear": [_P, _I, _P, _I, _P, _P, _P, _P, _I],
    "sc_team_attend": [_P, _I, _P, _I, _I, _P, _P, ctypes.c_long, _I, _P, ctypes.c_long, _P],
    "sc_team_logits": [_P, _P, _I, _I, _I, _P, _P, _P, _I],
    "sc_repack_int4": [_P, _I, _I, _P],
    "sc_step_run": [_P, _I, _P, _I, _P, ctypes.c_int64, _I],
    "sc_cpu_features": [],
    "sc_request_amx": [],
}


@cache
def library() -> ctypes.CDLL | None:
    """The compiled library with its entry points declared, or None where it was not built."""
    try:
        from appliance.kernels import _prompt_kernels
    except ImportError:
        return None
    lib = ctypes.CDLL(_prompt_kernels.__file__)
    for name, arguments in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, _I
    lib.sc_team_create.argtypes, lib.sc_team_create.restype = [_I], _P  # a team's handle, or None
    lib.sc_team_destroy.argtypes, lib.sc_team_destroy.restype = [_P], None
    return lib


def cpu_features() -> list[str]:
    """The kernel-relevant instruction sets this CPU and OS offer (empty without the library)."""
    lib = library()
    bits = lib.sc_cpu_features() if lib is not None else 0
    names = {**{name: bit for name, bit in PATHS.items()}, "avxvnni": AVX_VNNI, "amx": AMX_INT8}
    return [name for name, bit in names.items() if bits & bit]


@cache
def choice() -> tuple[str, str]:
    """(path, why): the path the kernels take here, ONNXRUNTIME for none; raises EngineError for a bad forced path."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced not in (*PATHS, ONNXRUNTIME):
        raise EngineError(f"{ENV}={forced!r} is not a kernel path: use one of {', '.join((*PATHS, ONNXRUNTIME))}")
    if forced == ONNXRUNTIME:
        return ONNXRUNTIME, f"forced by {ENV}"
    lib = library()
    if lib is None:
        if forced:
            raise EngineError(f"{ENV}={forced} but the kernels are not built in this install")
        return ONNXRUNTIME, "not built (no C compiler at install time, or not x86-64 Linux)"
    have = lib.sc_cpu_features()
    if forced:
        if not have & PATHS[forced]:
            raise EngineError(f"{ENV}={forced} but this CPU lacks it (it has: {', '.join(cpu_features()) or 'none'})")
        return forced, f"forced by {ENV}"
    for path, bit in PATHS.items():
        if have & bit:
            return path, "chosen by CPUID"
    return ONNXRUNTIME, "this CPU has no AVX2/FMA"


def path() -> str:
    """``avx512vnni``, ``avx2`` or ``onnxruntime`` (see the module's doc); EngineError for a bad ``STREAMCHAT_KERNEL``."""
    return choice()[0]


def load() -> ctypes.CDLL | None:
    """The library where a path of ours runs here, else None (callers keep onnxruntime's kernels)."""
    return library() if path() != ONNXRUNTIME else None


def check(code: int, function: str) -> None:
    """Raise the refusal a kernel entry point returned (``REFUSALS``); 0 is success."""
    if code:
        raise EngineError(f"the CPU kernel refused a call to {function}: {REFUSALS.get(code, f'code {code}')} "
                          "(the Python side should have prevented it: please report this)")


def describe() -> str:
    """One line for ``streamchat --self-test`` and the About box: the path, why, and what the CPU offers."""
    try:
        chosen, why = choice()
    except EngineError as exc:
        return str(exc)
    features = ", ".join(cpu_features()) or "none"
    if chosen == ONNXRUNTIME:
        return f"onnxruntime's kernels ({why}; CPU: {features})"
    return f"{chosen} INT4 kernels for prompts and decode ({why}; CPU: {features})"
