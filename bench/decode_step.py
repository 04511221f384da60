"""The engine's decode step on the C kernels against onnxruntime's decode, in turns: ms a token, share of the memory
floor, peak RSS, greedy agreement.

    python bench/decode_step.py BUNDLE [--rounds 3] [--context 128] [--steps 16]

BUNDLE is an INT4 ``cpu`` bundle (``python -m model_export.synthetic`` at full width, then ``streamchat export``).
Each round runs two fresh processes, one after the other, each prefilling the same ``--context``-token prompt and then
timing ``--steps`` greedy decode steps (their median):

- ``kernels``: the engine as the app opens it: the step recorded from the model definition and run in C on repacked
  weights (``appliance/engines/kernel_decode.py``), the prompt on the C prompt kernels; no onnxruntime session.
- ``onnxruntime``: the engine with its kernels off (``kernels=False``): onnxruntime's graph for the prompt and
  every step.

The read bandwidth is measured before and after each process; the floor is the bytes a step must read (the bundle's
weights plus the cached keys and values) at that bandwidth. The kernels' step is also timed by part: the recorded
program run with one kind of instruction at a time.
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


def child(bundle_dir: str, kernels: bool, context: int, steps: int) -> dict:
    from appliance.bundle import Bundle
    from appliance.kernels import describe

    bundle = Bundle.open(bundle_dir, full_check=False)
    engine, tok = bundle.engine(kernels=kernels), bundle.tokenizer()
    ids, layout = _prompt(tok, context)
    seq = engine.start()
    logits = seq.prefill(ids, layout.position_ids(), layout.mask())
    times, tokens = [], []
    for past in range(context, context + steps):
        tokens.append(int(logits.argmax()))
        start = time.perf_counter()
        logits = seq.step(tokens[-1], layout.step_position(past + 1))
        times.append(time.perf_counter() - start)
    decoder = type(engine.decoder).__name__
    return {"ms": float(np.median(times) * 1e3), "tokens": tokens, "peak_rss_gb": peak_rss_gb(),
            "parts_ms": parts_ms(engine.decoder, context + steps) if decoder == "KernelDecoder" else None,
            "kernels": f"{decoder}, {engine.prefill.name} prefill; {describe()}" if kernels else
            "onnxruntime's MatMulNBits, GroupQueryAttention"}


PARTS = {"GEMV": ("LINEAR",), "logits": ("LOGITS",), "attention": ("ATTEND",), "LayerNorm, GELU": ("LAYER_NORM", "GELU"),
         "elementwise": ("COPY", "ADD", "MUL")}


def parts_ms(decoder, past: int, repeats: int = 9) -> dict[str, float]:
    """Where the recorded step's time goes: the program run with one kind of instruction at a time (median of
    ``repeats``), on the cache as the timed steps left it."""
    from appliance.kernels import step_program

    program = decoder.program
    whole = program.code.copy()
    out = {}
    try:
        for part, names in PARTS.items():
            program.code = np.ascontiguousarray(whole[np.isin(whole.T[0], [getattr(step_program, n) for n in names])])
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                decoder.kernels.run(program, past)
                times.append(time.perf_counter() - start)
            out[part] = float(np.median(times) * 1e3)
    finally:
        program.code = whole
    return out


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
        print(json.dumps(child(str(args.bundle), args.child == "kernels", args.context, args.steps)))
        return
    bundle = args.bundle.resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    nbytes = step_bytes(bundle, manifest, args.context)
    print(f"one step reads {nbytes / 1e9:.2f} GB (weights + KV cache at context {args.context})")
    print(f"| round | decode by | GB/s before/after | ms/token (median of {args.steps}) | share of floor | peak RSS GB "
          f"| {' / '.join(PARTS)} ms | kernels |")
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
            parts = " / ".join(f"{ms:.1f}" for ms in out["parts_ms"].values()) if out["parts_ms"] else "-"
            print(f"| {r + 1} | {kind} | {before:.1f}/{after:.1f} | {out['ms']:.1f} | {floor_ms / out['ms']:.0%} | "
                  f"{out['peak_rss_gb']:.2f} | {parts} | {out['kernels']} |", flush=True)
            tokens.setdefault(kind, out["tokens"])
    same = sum(a == b for a, b in zip(tokens["kernels"], tokens["onnxruntime"], strict=True))
    print(f"\ngreedy tokens equal in {same} of {args.steps} steps (kernels against onnxruntime)")


if __name__ == "__main__":
    main()
