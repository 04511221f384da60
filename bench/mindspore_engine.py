"""MindSpore-engine step time, prefill time and peak memory beside onnxruntime's, on the same Ascend bundle (CPU).

    python bench/mindspore_engine.py [--sizes mid full2] [--weights bundle int8 int4] [--no-onnxruntime] [--rounds 2]
                                     [--prompt 48] [--steps 24] [--work DIR]

Sizes (synthetic checkpoints, ``model_export.synthetic.write_checkpoint``, ChatGLM-6B's vocabulary of 130528, exported
to ascend-310b bundles in ``--work`` and reused by the next run):
- ``mid``: hidden 1024, 16 heads, 6 layers, fp16 bundle (209M parameters; its fp32 export misses the 1e-4 check);
- ``full2``: ChatGLM-6B's width (hidden 4096, 32 heads), 2 layers, fp16 bundle.

Each measurement runs in its own process (its peak RSS is that process's ``VmHWM``), the engines alternating
round by round. A measurement opens the bundle (``load``), prefills a ``--prompt``-token prompt (the smallest gear
that holds it; the first prefill compiles MindSpore's graph, so the prefill is timed on a second sequence) and takes
``--steps`` greedy steps, the first ``WARMUP`` left out of the median. onnxruntime runs the bundle's fp32 check graphs,
MindSpore the same fp16 weights in fp32, or (``--weights``) held as int8 / int4 codes quantized at load
(``EngineOptions.weights``; the peak RSS column is the memory each weight format needs here). Informational: the CPU
is not the mindspore engine's target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = {  # name -> (widths, layers, quant)
    "mid": ({"hidden_size": 1024, "num_attention_heads": 16, "inner_hidden_size": 4096}, 6, "fp16"),
    "full2": ({}, 2, "fp16"),
}
ENGINES = ("mindspore", "onnxruntime")
WEIGHTS = ("bundle", "int8", "int4")  # the mindspore engine's weight formats: the bundle's own, or quantized at load
WARMUP = 2


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown CPU")


def bundle_for(size: str, work: Path) -> Path:
    """The size's bundle in ``work``: the one a previous run exported if this StreamChat still opens it."""
    from appliance.bundle import Bundle
    from appliance.errors import BundleError
    from model_export.export import export_bundle
    from model_export.synthetic import write_checkpoint

    widths, layers, quant = SIZES[size]
    path = work / size / "bundle"
    try:
        Bundle.open(path)
    except BundleError:
        checkpoint = write_checkpoint(work / size / "checkpoint", layers=layers, widths=widths)
        export_bundle(checkpoint, path, target="ascend-310b", quant=quant, force=True)
    return path


def measure(engine_name: str, bundle_path: Path, prompt: int, steps: int, threads: int | None,
            weights: str = "bundle") -> dict:
    """One engine on one bundle (``weights``: the mindspore engine's format), in this process: load seconds, prefill
    ms, median ms per step."""
    from appliance.bundle import Bundle
    from appliance.positions import layout_of

    started = time.perf_counter()
    bundle = Bundle.open(bundle_path)
    engine = bundle.engine(kind=engine_name, threads=threads, weights=None if weights == "bundle" else weights)
    load = time.perf_counter() - started
    special = bundle.tokenizer().special
    ids = [int(i) for i in np.random.default_rng(prompt).integers(100, 20000, prompt - 2)] + [special.gmask, special.bos]
    layout = layout_of(ids, special.bos, special.gmask, special.mask)
    result = {"load_s": load}
    for attempt in ("compile", "timed"):
        sequence = engine.start()
        started = time.perf_counter()
        logits = sequence.prefill(np.array(ids), layout.position_ids(), layout.mask())
        result[f"prefill_{attempt}_ms"] = 1000 * (time.perf_counter() - started)
    seconds = []
    for n in range(steps):
        started = time.perf_counter()
        logits = sequence.step(int(logits.argmax()), layout.step_position(prompt + n + 1))
        seconds.append(time.perf_counter() - started)
    result["step_ms"] = 1000 * float(np.median(seconds[WARMUP:]))
    return result


def peak_rss_gb() -> float:
    """This process's peak resident set in 1e9 bytes: ``VmHWM``, which starts afresh at exec (``ru_maxrss`` carries
    the parent's peak over fork and exec, the exporting parent's included)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) * 1024 / 1e9 for line in fh if line.startswith("VmHWM:"))


def run_child(work: Path, *args: str) -> str:
    """This script with ``args`` in a process of its own (a measurement, or an export, which would otherwise leave
    its memory in this process): its last line of output."""
    done = subprocess.run([sys.executable, __file__, "--work", str(work), *args], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(args)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES), help="model sizes to run")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per engine and size (engines alternate)")
    parser.add_argument("--prompt", type=int, default=48, help="prompt length in tokens (at least 3)")
    parser.add_argument("--steps", type=int, default=24, help=f"greedy steps (the first {WARMUP} are not timed)")
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=["bundle"],
                        help="the mindspore engine's weight formats, one row each (default: the bundle's own)")
    parser.add_argument("--no-onnxruntime", action="store_true", help="leave out the onnxruntime rows (its four check "
                        "graphs peak at 18 GB at full2)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the engines' own)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/streamchat-bench-mindspore"),
                        help="the synthetic checkpoints and bundles")
    parser.add_argument("--measure", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--measure-weights", choices=WEIGHTS, default="bundle", help=argparse.SUPPRESS)
    parser.add_argument("--export", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prompt < 3 or args.steps <= WARMUP:
        parser.error(f"--prompt must be at least 3 and --steps more than {WARMUP}")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(args.work / "cache"))
    if args.measure:
        result = measure(args.measure, args.bundle, args.prompt, args.steps, args.threads, args.measure_weights)
        print(json.dumps(result | {"peak_rss_gb": peak_rss_gb()}))
        return 0
    if args.export:
        print(bundle_for(args.export, args.work))
        return 0
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; prompt {args.prompt} tokens, {args.steps} steps, "
          f"{args.rounds} rounds per engine (alternating, one process each)")
    rows = []
    variants = [("mindspore", weights) for weights in args.weights] + [("onnxruntime", "bundle")] * (not args.no_onnxruntime)
    for size in args.sizes:
        path = Path(run_child(args.work, "--export", size))
        runs: dict[tuple[str, str], list[dict]] = {variant: [] for variant in variants}
        for n in range(args.rounds):
            for name, weights in variants if n % 2 == 0 else variants[::-1]:
                runs[name, weights].append(json.loads(run_child(
                    args.work, "--measure", name, "--measure-weights", weights, "--bundle", str(path), "--prompt",
                    str(args.prompt), "--steps", str(args.steps),
                    *(["--threads", str(args.threads)] if args.threads else []))))
        for (name, weights), results in runs.items():
            best = {key: min(r[key] for r in results) for key in results[0]}
            held = SIZES[size][2] if weights == "bundle" else weights
            rows.append(f"| {size} ({SIZES[size][2]} bundle) | {name} | {held} | {best['step_ms']:.1f} | "
                        f"{best['prefill_timed_ms']:.0f} | {best['prefill_compile_ms']:.0f} | {best['load_s']:.1f} | "
                        f"{best['peak_rss_gb']:.2f} |")
    print()
    print("| model | engine | weights held | ms/token (median) | prefill ms | first prefill ms (compiles) | load s | "
          "peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    from appliance.errors import StreamChatError

    try:
        sys.exit(main())
    except StreamChatError as exc:  # an export that fails verification, a bundle that does not open: one line
        sys.exit(f"error: {exc}")
