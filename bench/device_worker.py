"""The per-token cost of the process boundary of ``serve --devices``: decode steps through ``WorkerEngine`` (the
engine in a worker process, logits back over a pipe) beside the same engine called in process, same bundle.

    python bench/device_worker.py [--models demo full2] [--steps 64] [--rounds 2] [--work DIR]

Models: ``demo``, the built-in demo's cpu bundle (int8, vocabulary 1085) on onnxruntime; ``full2``, ChatGLM-6B's
width and vocabulary (130528: 522 KB of fp32 logits per token), 2 layers, fp16 ascend-310b bundle as
bench/mindspore_engine.py builds it (reused from ``--work``), on onnxruntime (its fp32 check graphs) and on
MindSpore (CPU). Per engine and round: in process, then in a worker, each a fresh load and ``--steps`` greedy steps
after a 48-token prompt, the first two left out. ``boundary`` is a worker call's time minus the engine's own time in
the child (``WorkerEngine.engine_s``): framing, the pipe both ways and two process wake-ups.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mindspore_engine import bundle_for, cpu_name  # noqa: E402

from appliance.engines import EngineOptions  # noqa: E402
from appliance.engines.worker import load_in_worker  # noqa: E402
from appliance.loading import open_bundle  # noqa: E402
from appliance.positions import layout_of  # noqa: E402

WARMUP = 2
PROMPT = 48


def steps(model, count: int) -> tuple[list[float], list[float]]:
    """Per step: the call's time and, in a worker, the engine's own time there (else the call's)."""
    tok = model.tokenizer
    ids = [5 + i % 1000 for i in range(PROMPT - 2)] + [tok.special.gmask, tok.special.bos]
    layout = layout_of(ids, tok.special.bos, tok.special.gmask, tok.special.mask)
    sequence = model.engine.start()
    logits = sequence.prefill(np.array(ids), layout.position_ids(), layout.mask())
    calls, own = [], []
    for n in range(count):
        started = time.perf_counter()
        logits = sequence.step(int(np.argmax(logits)), layout.step_position(len(ids) + n + 1))
        calls.append(time.perf_counter() - started)
        own.append(getattr(model.engine, "engine_s", calls[-1]))
    return calls[WARMUP:], own[WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=("demo", "full2"), default=["demo", "full2"])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/streamchat-bench-mindspore"))
    args = parser.parse_args()
    runs = []
    if "demo" in args.models:
        from appliance.folders import data_dir
        from appliance.loading import demo_bundle
        from appliance.settings import load_settings
        from streamchat.models import export_demo

        runs.append(("demo", demo_bundle(data_dir(load_settings()), export_demo), "onnxruntime"))
    if "full2" in args.models:
        full2 = bundle_for("full2", args.work)
        runs += [("full2", full2, "onnxruntime"), ("full2", full2, "mindspore")]
    print(f"CPU: {cpu_name()}; {args.rounds} rounds x {args.steps} steps; medians in ms per token")
    print("| model | engine | in process | in a worker | engine in the worker | boundary | boundary share |")
    print("|---|---|---|---|---|---|---|")
    for name, bundle, kind in runs:
        local, worker, child = [], [], []
        for _ in range(args.rounds):
            model = open_bundle(bundle, engine=kind)
            local += steps(model, args.steps)[0]
            del model
            model = load_in_worker(bundle, kind, EngineOptions())
            calls, own = steps(model, args.steps)
            model.engine.close()
            worker += calls
            child += own
        boundary = float(np.median(np.array(worker) - np.array(child)))
        ms = [float(np.median(v)) * 1000 for v in (local, worker, child)]
        print(f"| {name} | {kind} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[2]:.3f} | {boundary * 1000:.3f} | "
              f"{boundary * 1000 / ms[0]:.1%} |", flush=True)


if __name__ == "__main__":
    main()
