"""A whole decode step on the C kernels against onnxruntime's decode, in turns: what decoding outside onnxruntime
would gain, and where its time goes.

    python bench/decode_step.py BUNDLE [--rounds 3] [--context 128] [--steps 16]

BUNDLE is an INT4 ``cpu`` bundle (``python -m model_export.synthetic`` at full width, then ``streamchat export``).
Each round runs two fresh processes, one after the other, each prefilling the same ``--context``-token prompt and then
timing ``--steps`` greedy decode steps (their median):

- ``kernels``: every layer as ``appliance.model.definition`` writes it, in numpy around the C kernels
  (``appliance.kernels.decode_kernels`` on one thread team): the GEMV for the four linear layers, attention over the
  fp16 cache, the logits; LayerNorm in C as the prompt path runs it. The weights stay in the bundle's memory map (its
  pages are kept, not dropped as the prompt path drops them), so the process holds one copy: onnxruntime's session is
  never opened.
- ``onnxruntime``: the engine as the app opens it (onnxruntime's decode graph).

The read bandwidth is measured before and after each process; the floor is the bytes a step must read (the bundle's
weights plus the cached keys and values) at that bandwidth. The kernels' step is also timed by part: GEMV, attention,
logits, and the rest (numpy, Python, hand-offs between threads).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from speed import peak_rss_gb, read_bandwidth_gbs

ROOT = Path(__file__).resolve().parent.parent


def _prompt(tok, length: int):
    from appliance.positions import layout_of

    special = tok.special
    ids = np.random.default_rng(0).integers(tok.num_image_tokens + 100, tok.num_image_tokens + 1000,
                                            size=length - 2).tolist() + [special.gmask, special.bos]
    return np.array(ids), layout_of(ids, special.bos, special.gmask, special.mask)


def child_kernels(bundle_dir: str, context: int, steps: int) -> dict:
    from appliance.bundle import Bundle
    from appliance.engines.cpu import physical_cores
    from appliance.engines.int4_prefill import HEAD, Int4Prefill, _int4_weight, _KernelOps
    from appliance.kernels.decode_kernels import DecodeKernels
    from appliance.kernels.native import path
    from appliance.model.definition import attention_inputs, attention_output, net_attention_scale, rotary_tables
    from appliance.model.weights import FINAL_NORM

    bundle = Bundle.open(bundle_dir, full_check=False)
    config, tok = bundle.config, bundle.tokenizer()
    rows = Int4Prefill.open(bundle.path / bundle.manifest["graphs"]["decoder"], config, physical_cores())
    if rows is None:
        raise SystemExit("the kernels do not take this bundle (INT4 weights, a quantized lm_head, an AVX2 CPU)")
    rows.tensors.keep_pages = True
    kernels = rows.kernels
    decode = DecodeKernels(kernels.lib, kernels.threads)
    capacity = context + steps + 1
    cache = [np.zeros((1, config.num_heads, capacity, config.head_dim), np.float16)
             for _ in range(2 * config.num_layers)]
    scale = np.float32(net_attention_scale(config.head_dim))
    parts = {"gemv": 0.0, "attention": 0.0, "logits": 0.0}

    class DecodeOps(_KernelOps):
        def linear(self, name: str, x: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            y = decode.linear(x, _int4_weight(self.weights, name))[None]
            parts["gemv"] += time.perf_counter() - start
            return y

        def lm_head(self, x: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            t = self.weights
            logits = decode.logits(x, t[HEAD + ".qweight"], t[HEAD + ".scales"], self.head_bits)
            parts["logits"] += time.perf_counter() - start
            return logits

    def step(token: int, position: np.ndarray, past: int) -> np.ndarray:
        ops = DecodeOps(rows, position.reshape(2, 1))
        rope = rotary_tables(ops)
        x = ops.embed(np.array([token]))
        for n in range(config.num_layers):
            ln1, q, k, v = attention_inputs(ops, n, x, rope)
            keys, values = cache[2 * n][0], cache[2 * n + 1][0]
            kernels.store_heads(k, keys[:, past:past + 1])
            kernels.store_heads(v, values[:, past:past + 1])
            start = time.perf_counter()
            context_rows = decode.attend(q[0] * scale, keys, values, past + 1)
            parts["attention"] += time.perf_counter() - start
            x = attention_output(ops, n, ln1, context_rows.reshape(1, -1))
        return ops.lm_head(ops.layer_norm(FINAL_NORM, x[-1]))

    ids, layout = _prompt(tok, context)
    logits = rows.run(ids, layout.position_ids(), layout.mask(), cache)
    times, tokens, by_part = [], [], []
    for past in range(context, context + steps):
        tokens.append(int(logits.argmax()))
        parts.update(dict.fromkeys(parts, 0.0))
        start = time.perf_counter()
        logits = step(tokens[-1], layout.step_position(past + 1), past)
        times.append(time.perf_counter() - start)
        by_part.append({**parts, "rest": times[-1] - sum(parts.values())})
    return {"ms": float(np.median(times) * 1e3),
            "parts_ms": {part: float(np.median([p[part] for p in by_part]) * 1e3) for part in by_part[0]},
            "tokens": tokens, "peak_rss_gb": peak_rss_gb(),
            "kernels": f"{path()} GEMV, attention and logits on {decode.threads} threads"}


def child_onnxruntime(bundle_dir: str, context: int, steps: int) -> dict:
    from appliance.bundle import Bundle

    bundle = Bundle.open(bundle_dir, full_check=False)
    engine, tok = bundle.engine(), bundle.tokenizer()
    ids, layout = _prompt(tok, context)
    seq = engine.start()
    logits = seq.prefill(ids, layout.position_ids(), layout.mask())
    times, tokens = [], []
    for past in range(context, context + steps):
        tokens.append(int(logits.argmax()))
        start = time.perf_counter()
        logits = seq.step(tokens[-1], layout.step_position(past + 1))
        times.append(time.perf_counter() - start)
    return {"ms": float(np.median(times) * 1e3), "tokens": tokens, "peak_rss_gb": peak_rss_gb(),
            "kernels": "onnxruntime's MatMulNBits, GroupQueryAttention"}


def step_bytes(bundle: Path, manifest: dict, context: int) -> int:
    """What one step reads: the decoder's data file (its weights) and the cached keys and values of ``context``
    positions in the cache's element type."""
    config = manifest["model"]["config"]
    element = 4 if manifest["graphs"].get("kv_cache") == "fp32" else 2
    data = bundle / (manifest["graphs"]["decoder"] + ".data")
    return data.stat().st_size + 2 * config["num_layers"] * context * config["hidden_size"] * element


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--child", choices=["kernels", "onnxruntime"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = child_kernels if args.child == "kernels" else child_onnxruntime
        print(json.dumps(child(str(args.bundle), args.context, args.steps)))
        return
    bundle = args.bundle.resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    nbytes = step_bytes(bundle, manifest, args.context)
    print(f"one step reads {nbytes / 1e9:.2f} GB (weights + KV cache at context {args.context})")
    print("| round | decode by | GB/s before/after | ms/token (median of "
          f"{args.steps}) | share of floor | GEMV / attention / logits / rest ms | peak RSS GB | kernels |")
    print("|---|---|---|---|---|---|---|---|")
    tokens = {}
    for r in range(args.rounds):
        for kind in ("kernels", "onnxruntime"):
            before = read_bandwidth_gbs(256, repeats=3)
            run = subprocess.run([sys.executable, __file__, str(bundle), "--child", kind, "--context",
                                  str(args.context), "--steps", str(args.steps)], capture_output=True, text=True,
                                 cwd=ROOT)
            if run.returncode:
                last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise SystemExit(f"the {kind} process failed: {last}")
            out = json.loads(run.stdout.splitlines()[-1])
            after = read_bandwidth_gbs(256, repeats=3)
            floor_ms = nbytes / ((before + after) / 2 * 1e9) * 1e3
            parts = out.get("parts_ms")
            split_ms = " / ".join(f"{parts[p]:.1f}" for p in ("gemv", "attention", "logits", "rest")) if parts else "-"
            print(f"| {r + 1} | {kind} | {before:.1f}/{after:.1f} | {out['ms']:.1f} | {floor_ms / out['ms']:.0%} | "
                  f"{split_ms} | {out['peak_rss_gb']:.2f} | {out['kernels']} |", flush=True)
            tokens.setdefault(kind, out["tokens"])
    same = sum(a == b for a, b in zip(tokens["kernels"], tokens["onnxruntime"], strict=True))
    print(f"\ngreedy tokens equal in {same} of {args.steps} steps (kernels against onnxruntime)")


if __name__ == "__main__":
    main()
