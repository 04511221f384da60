"""Bytes the MindSpore Lite step server copies per decode step, at several context lengths.

Beside them, what carrying the KV cache through numpy arrays would copy.

    python bench/ascend_host_bytes.py [--bundle DIR] [--prompts 16 400 1000] [--steps 16] [--work DIR]

Without ``--bundle``: a synthetic checkpoint (hidden 512, 8 heads, 8 layers, max_sequence_length 1024, ChatGLM-6B's
vocabulary) exported to an ascend-910b fp32 bundle in ``--work``, reused by the next run, as is the MindIR Lite
converts on first use. For each prompt length: a prefill, then greedy decode steps through the real step server
(Lite's CPU backend, the bundle's fp32 check graphs; ``STREAMCHAT_LITE_PYTHON`` names its Python). The server reports
what each run copied between numpy arrays and Lite tensors or between Lite tensors (``host_bytes``,
``lite_server.Server.run``); carrying the cache through numpy arrays, a step would send every ``past_*`` input in
and take every present out: twice the cache, plus the same inputs and logits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from appliance.bundle import Bundle
from appliance.engines.memory import kv_cache_bytes
from appliance.errors import BundleError, StreamChatError
from appliance.positions import layout_of
from model_export.export import export_bundle
from model_export.synthetic import write_checkpoint

WIDTHS = {"hidden_size": 512, "num_attention_heads": 8, "inner_hidden_size": 2048, "max_sequence_length": 1024}
LAYERS = 8
SEED = 4  # its fp32 export verifies with the widest margin of the seeds tried (max |dlogit| 7.6e-5, threshold 1e-4)
FP32 = 4
WARMUP = 2  # steps after each prefill left out of the median time


def cpu_name() -> str:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
        return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "unknown CPU")


def synthetic_bundle(work: Path) -> Bundle:
    """The synthetic bundle in ``work``: the one a previous run exported if this StreamChat still opens it."""
    path = work / "bundle"
    try:
        return Bundle.open(path)
    except BundleError:
        checkpoint = write_checkpoint(work / "checkpoint", layers=LAYERS, seed=SEED, widths=WIDTHS)
        return Bundle.open(export_bundle(checkpoint, path, target="ascend-910b", quant="fp32", force=True).bundle)


def run_prompt(engine, bundle: Bundle, length: int, steps: int) -> tuple[int, list[int], list[float]]:
    """A made-up ``length``-token prompt and ``steps`` greedy steps: the prefill's host bytes, each step's host bytes
    and seconds."""
    special = bundle.tokenizer().special
    rng = np.random.default_rng(length)
    ids = [int(i) for i in rng.integers(100, 20000, length - 2)] + [special.gmask, special.bos]
    layout = layout_of(ids, special.bos, special.gmask, special.mask)
    sequence = engine.start()
    logits = sequence.prefill(np.array(ids), layout.position_ids(), layout.mask())
    prefill_bytes, step_bytes, seconds = engine.runner.host_bytes, [], []
    for n in range(steps):
        started = time.perf_counter()
        logits = sequence.step(int(logits.argmax()), layout.step_position(length + n + 1))
        seconds.append(time.perf_counter() - started)
        step_bytes.append(engine.runner.host_bytes)
    return prefill_bytes, step_bytes, seconds


def mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def exact(n: int) -> str:
    return f"{n:,} B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="an Ascend bundle to run (default: the synthetic one in --work)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 400, 1000],
                        help="prompt lengths in tokens (each must fit a prefill gear and leave room for --steps)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps after each prompt")
    parser.add_argument("--threads", type=int, help="Lite's CPU threads (default: Lite's own)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/streamchat-bench-host-bytes"),
                        help="the synthetic bundle and Lite's converted graphs")
    args = parser.parse_args(argv)
    if not os.environ.get("STREAMCHAT_LITE_PYTHON"):
        print("set STREAMCHAT_LITE_PYTHON to a Python that has the mindspore_lite wheel", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(args.work / "cache"))
    bundle = Bundle.open(args.bundle) if args.bundle else synthetic_bundle(args.work)
    cfg = bundle.config
    started = time.perf_counter()
    engine = bundle.engine(kind="mindspore-lite", threads=args.threads)
    capacity = engine.max_context
    too_long = [p for p in args.prompts if p > engine.gears[-1] or p + args.steps > capacity]
    if too_long or min(args.prompts) < 2 or args.steps <= WARMUP:
        parser.error(f"prompts take 2 to {engine.gears[-1]} tokens and leave {args.steps} of the {capacity} cache "
                     f"positions for the steps; --steps must exceed {WARMUP} (got prompts {args.prompts})")
    cache = kv_cache_bytes(cfg, capacity)
    inputs = FP32 + 2 * FP32 + 2 * capacity * FP32  # input_ids, position_ids, attention_bias, write_slot
    old = 2 * cache + inputs + cfg.vocab_size * FP32
    try:
        engine.runner.reset()  # starts the server: converts (first run) and builds every graph
        print(f"CPU: {cpu_name()}; MindSpore Lite CPU backend, fp32 check graphs; load {time.perf_counter() - started:.1f} s")
        print(f"bundle: {bundle.path} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
              f"vocab {cfg.vocab_size}); capacity {capacity}, prefill gears {engine.gears}")
        print(f"KV cache {mb(cache)} (one layer's {mb(cache / cfg.num_layers)}); logits {mb(cfg.vocab_size * FP32)}")
        print()
        print("| context length | host bytes per decode step | through numpy (2 x cache + inputs + logits) "
              "| ms per step (median) | prefill host bytes (once per prompt) |")
        print("|---|---|---|---|---|")
        for length in args.prompts:
            prefill_bytes, step_bytes, seconds = run_prompt(engine, bundle, length, args.steps)
            per_step = " / ".join(exact(b) for b in sorted(set(step_bytes)))
            ms = 1000 * float(np.median(seconds[WARMUP:]))
            print(f"| {length + 1}..{length + args.steps} | {per_step} | {exact(old)} | {ms:.1f} | {exact(prefill_bytes)} |",
                  flush=True)
    finally:
        engine.runner.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StreamChatError as exc:  # a bundle that does not open, a step server that fails: one line
        sys.exit(f"error: {exc}")
