"""C kernels for the cpu target, chosen at run time by CPUID (``native``): INT4 prompt GEMM, decode GEMV, GELU."""

from appliance.kernels.native import describe

__all__ = ["describe"]
