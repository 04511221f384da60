"""C kernels for the cpu target, chosen at run time by CPUID (``native``): INT4 prompt GEMM and what runs around it
(LayerNorm, GELU, fp16 cache writes, the logits), and a decode step's GEMV and attention on a thread team."""

from appliance.kernels.native import describe

__all__ = ["describe"]
