"""What bounds the cpu target on this machine: the matmul kernels alone, on ChatGLM-6B's shapes.

    python bench/kernels.py              # every weight format through onnxruntime, and the prompt kernels
    python bench/kernels.py --compare [--rounds 3]
                                         # StreamChat's kernels on each path this CPU has against onnxruntime's
                                         # MatMulNBits on the same weights, in alternating rounds

Decode reads every weight once per token, so its kernels should stream at the machine's read bandwidth; prefill
multiplies a whole prompt, so its kernels should reach the cores' arithmetic peak. This times the kernels alone (random
weights; the values do not change the speed) and prints, for decode (one row), the bytes/s each weight format streams
at against the measured bandwidth, and for prefill (a 128-token prompt), the multiply-adds/s of the INT4 kernels
(onnxruntime's and StreamChat's AVX2 prompt kernel) next to fp32 SGEMM and int8 QGEMM, and the 28-layer prompt rate
each rate would allow at most.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from speed import read_bandwidth_gbs

HIDDEN, INNER, VOCAB, LAYERS = 4096, 16384, 130528, 28
LAYER_PARAMS = HIDDEN * 3 * HIDDEN + HIDDEN * HIDDEN + 2 * HIDDEN * INNER  # qkv, dense, MLP in and out
PROMPT = 128


def session(nodes: list, weights: dict[str, np.ndarray], out_type: int = TensorProto.FLOAT) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "kernel", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", None])],
                              [helper.make_tensor_value_info("Y", out_type, None)],
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the engine runs
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def matmul_nbits(shapes: list[tuple[int, int]], bits: int, block: int, accuracy: int) -> tuple[ort.InferenceSession, int]:
    """A chain of MatMulNBits nodes with distinct weights (K x N each), and the bytes those weights occupy."""
    rng = np.random.default_rng(0)
    nodes, weights, x = [], {}, "A"
    for i, (k, n) in enumerate(shapes):
        weights[f"B{i}"] = rng.integers(0, 256, size=(n, k // block, block * bits // 8), dtype=np.uint8)
        weights[f"S{i}"] = rng.random(n * k // block, dtype=np.float32) * 0.01
        y = "Y" if i == len(shapes) - 1 else f"X{i}"
        nodes.append(helper.make_node("MatMulNBits", [x, f"B{i}", f"S{i}"], [y], domain="com.microsoft", K=k, N=n,
                                      bits=bits, block_size=block, accuracy_level=accuracy))
        x = y
    return session(nodes, weights), sum(w.nbytes for w in weights.values())


def sgemm(k: int, n: int) -> ort.InferenceSession:
    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    return session([helper.make_node("MatMul", ["A", "W"], ["Y"])], {"W": weight})


def qgemm(k: int, n: int) -> ort.InferenceSession:
    """int8 weights with one scale per column: activations quantized per call, then MLAS's u8s8 GEMM."""
    weight = np.random.default_rng(0).integers(-127, 128, size=(k, n), dtype=np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["A"], ["Aq", "As", "Az"]),
             helper.make_node("MatMulInteger", ["Aq", "W", "Az"], ["Y"])]
    return session(nodes, {"W": weight}, TensorProto.INT32)


def prompt_kernel(k: int, n: int, block: int, kernel: str | None = None) -> Callable[[np.ndarray], np.ndarray] | None:
    """StreamChat's INT4 prompt kernel (the chosen path, or ``kernel``) on MatMulNBits weights, activations quantized
    per call like acc 4's."""
    from appliance.kernels.prompt_kernels import Int4Weight, PromptKernels, load

    if load() is None:
        return None
    rng = np.random.default_rng(0)
    weight = Int4Weight(rng.integers(0, 256, size=(n, k // block, block // 2), dtype=np.uint8),
                        rng.random((n, k // block), dtype=np.float32) * 0.01)
    kernels = PromptKernels(load(), threads=2, kernel=kernel)
    return lambda a: kernels.matmul(kernels.quantize(a, block), weight)


DECODE_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, INNER), (INNER, HIDDEN)]  # (K, N): dense, MLP in, MLP out
STREAM_BYTES = 256e6  # distinct copies of each matrix up to this size: 8x the L3 caches seen, so weights stream


def decode_pair(k: int, n: int, block: int = 128) -> tuple[ort.InferenceSession, list, int]:
    """Distinct INT4 K x N matrices filling STREAM_BYTES, as parallel MatMulNBits nodes (acc 4, as bundles export) and
    as the same arrays for StreamChat's GEMV; their bytes."""
    from appliance.kernels.prompt_kernels import Int4Weight

    rng = np.random.default_rng(0)
    per = n * k // 2 + n * k // block * 4
    copies = max(1, int(np.ceil(STREAM_BYTES / per)))
    nodes, weights, ours = [], {}, []
    for i in range(copies):
        packed = rng.integers(0, 256, size=(n, k // block, block // 2), dtype=np.uint8)
        scales = rng.random((n, k // block), dtype=np.float32) * 0.01
        weights[f"B{i}"], weights[f"S{i}"] = packed, scales.reshape(-1)
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B{i}", f"S{i}"], [f"Y{i}"], domain="com.microsoft", K=k,
                                      N=n, bits=4, block_size=block, accuracy_level=4))
        ours.append(Int4Weight(packed, scales))
    graph = helper.make_graph(nodes, "decode", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, None) for i in range(copies)],
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), ours, copies * per


def compare(rounds: int) -> None:
    """Side by side in one run: onnxruntime's MatMulNBits and StreamChat's kernels on every path this CPU has, each
    round measuring all of them in turn with the read bandwidth measured before and after it."""
    from appliance.kernels.decode_kernels import DecodeKernels
    from appliance.kernels.native import PATHS, cpu_features, library
    from appliance.kernels.step_program import PackedLinear

    lib = library()
    paths = [p for p in PATHS if p in cpu_features()]
    print(f"CPU features: {', '.join(cpu_features()) or 'none'}; paths measured: {', '.join(paths) or 'none'}")
    gemvs = {p: DecodeKernels(lib, 2, p) for p in paths}
    decode = {}
    for k, n in DECODE_SHAPES:
        sess, ours, nbytes = decode_pair(k, n)
        runners = {"onnxruntime": lambda a, sess=sess: sess.run(None, {"A": a})}
        packed = [PackedLinear.of(w, lib) for w in ours]  # the decode engine's copy of each matrix
        for p, gemv in gemvs.items():
            runners[p] = lambda a, gemv=gemv, packed=packed: [gemv.linear(a, w) for w in packed]
        decode[(k, n)] = runners, nbytes
    prompts = {"onnxruntime": matmul_nbits([(HIDDEN, INNER)], 4, 128, 4)[0]}
    prompts.update({p: prompt_kernel(HIDDEN, INNER, 128, p) for p in paths})
    results: dict[tuple, list[float]] = {}
    for r in range(rounds):
        before = read_bandwidth_gbs(256, repeats=3)
        for (k, n), (runners, nbytes) in decode.items():
            for name, run in runners.items():
                t = seconds(run, 1, k, 7)
                results.setdefault(("decode", k, n, name), []).append(nbytes / t / 1e9)
        for name, run in prompts.items():
            t = seconds(run, PROMPT, HIDDEN, 3)
            results.setdefault(("prefill", name), []).append(2 * PROMPT * HIDDEN * INNER / t / 1e9)
        after = read_bandwidth_gbs(256, repeats=3)
        results.setdefault(("bandwidth",), []).append((before + after) / 2)
        print(f"round {r + 1}: read bandwidth {before:.1f} before, {after:.1f} GB/s after", flush=True)
    bandwidth = results[("bandwidth",)]
    print("\ndecode, one row, INT4 block 128 (acc 4), weights streamed from memory: GB/s per round (share of that "
          "round's read bandwidth)")
    print("| K x N | kernel | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " |")
    print("|---|---|" + "---|" * rounds)
    for (k, n), (runners, _) in decode.items():
        for name in runners:
            rates = results[("decode", k, n, name)]
            print(f"| {k} x {n} | {name} | " + " | ".join(f"{v:.1f} ({v / b:.0%})" for v, b in zip(rates, bandwidth,
                                                                                                     strict=True)) + " |")
    print(f"\nprefill, {PROMPT} rows x {HIDDEN} x {INNER}, INT4 block 128, int8 activations: GFLOP/s per round")
    print("| kernel | " + " | ".join(f"round {r + 1}" for r in range(rounds)) + " |")
    print("|---|" + "---|" * rounds)
    for name in prompts:
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in results[("prefill", name)]) + " |")


def seconds(node: ort.InferenceSession | Callable[[np.ndarray], object], rows: int, k: int, repeats: int) -> float:
    """Median time of one call (a session, or a function of the input) on a ``rows`` x ``k`` input, after a warm-up."""
    run = node if callable(node) else (lambda a: node.run(None, {"A": a}))
    a = np.random.default_rng(1).standard_normal((rows, k), dtype=np.float32)
    run(a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(a)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth: {bandwidth:.1f} GB/s (2 threads, numpy sum, best of 5)\n")
    print("decode (1 row): how fast each weight format streams, through 4 MLPs (8 distinct matrices, like a model's "
          "layers, 8x the L3 cache) or the lm_head")
    print("| nodes | weights MB | ms | GB/s | share of bandwidth |")
    print("|---|---|---|---|---|")
    mlps = [(HIDDEN, INNER), (INNER, HIDDEN)] * 4
    decode = [("MLPs, int4, block 32, acc 4", mlps, 4, 32, 4),
              ("MLPs, int4, block 128, acc 0", mlps, 4, 128, 0),
              ("MLPs, int4, block 128, acc 4", mlps, 4, 128, 4),
              ("MLPs, int4, block 256, acc 4", mlps, 4, 256, 4),
              ("lm_head, int4, block 128, acc 4", [(HIDDEN, VOCAB)], 4, 128, 4),
              ("lm_head, int8, block 128, acc 4", [(HIDDEN, VOCAB)], 8, 128, 4)]
    for label, shapes, bits, block, accuracy in decode:
        sess, nbytes = matmul_nbits(shapes, bits, block, accuracy)
        t = seconds(sess, 1, HIDDEN, 15)
        print(f"| {label} | {nbytes / 1e6:.0f} | {t * 1e3:.1f} | {nbytes / t / 1e9:.1f} | "
              f"{nbytes / t / 1e9 / bandwidth:.0%} |", flush=True)
    print(f"\nprefill ({PROMPT} rows): arithmetic rate, and the 28-layer prompt rate it allows at most "
          f"({2 * LAYER_PARAMS * LAYERS / 1e9:.1f} GFLOP per prompt token)")
    print("| node | weights in memory | ms | GFLOP/s | at most prompt tokens/s |")
    print("|---|---|---|---|---|")
    prefill = [("MatMulNBits int4, block 128, acc 1 (fp32)", "0.53 B/weight", matmul_nbits([(HIDDEN, INNER)], 4, 128, 1)[0]),
               ("MatMulNBits int4, block 128, acc 4 (int8)", "0.53 B/weight", matmul_nbits([(HIDDEN, INNER)], 4, 128, 4)[0]),
               ("MatMulNBits int4, block 256, acc 4 (int8)", "0.52 B/weight", matmul_nbits([(HIDDEN, INNER)], 4, 256, 4)[0]),
               ("MatMul fp32 (MLAS SGEMM)", "4 B/weight", sgemm(HIDDEN, INNER)),
               ("MatMulInteger u8s8 (MLAS QGEMM)", "1 B/weight", qgemm(HIDDEN, INNER))]
    if (kernel := prompt_kernel(HIDDEN, INNER, 128)) is not None:
        prefill.insert(3, ("StreamChat prompt kernel, int4 block 128 (int8, AVX2)", "0.53 B/weight", kernel))
    for label, memory, sess in prefill:
        t = seconds(sess, PROMPT, HIDDEN, 5)
        rate = 2 * PROMPT * HIDDEN * INNER / t
        print(f"| {label} | {memory} | {t * 1e3:.1f} | {rate / 1e9:.0f} | {rate / (2 * LAYER_PARAMS * LAYERS):.1f} |",
              flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", action="store_true", help="StreamChat's kernels against onnxruntime's, in rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    compare(args.rounds) if args.compare else main()
