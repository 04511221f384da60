"""The cpu target's KV cache in fp16 against fp32, side by side in one process: speed and greedy agreement.

    python bench/kv_cache.py [--layers 2] [--work /tmp/streamchat-kv-bench] [--rounds 3] [--steps 64]

Writes a full-width synthetic checkpoint (``model_export.synthetic``), exports it to INT4 twice (``kv_cache`` fp32 and
fp16: the same weights), opens both bundles in this process and, alternating between them each round, measures the
128-token prompt (the engine's own prefill path and the graph's) and decode ms/token at contexts 128/1024/2000 (median
of 10 steps). Then the fp16-cache engine is run along the fp32-cache engine's greedy path (teacher-forced, three
prompts) for greedy agreement and max |dlogit|, and both decode greedily on their own until they first differ.
Prints one JSON object; the bundles and the checkpoint are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

CONTEXTS = (128, 1024, 2000)
PROMPT = 128
STEPS = 10
KINDS = ("fp32", "fp16")


def timed_prefill(engine, tok, ids: list[int], graph: bool = False):
    from appliance.positions import layout_of

    layout = layout_of(ids, tok.special.bos, tok.special.gmask, tok.special.mask)
    path = engine.prefill_paths(np.array(ids), layout.mask())["graph"] if graph else engine
    seq = path.start()
    start = time.perf_counter()
    logits = seq.prefill(np.array(ids), layout.position_ids(), layout.mask())
    return seq, layout, logits, time.perf_counter() - start


def decode_ms(engine, tok, text: list[int], context: int) -> float:
    ids = text[: context - STEPS // 2 - 2] + [tok.special.gmask, tok.special.bos]
    seq, layout, _, _ = timed_prefill(engine, tok, ids)
    total, times = len(ids), []
    for _ in range(STEPS):
        total += 1
        start = time.perf_counter()
        seq.step(text[total % len(text)], layout.step_position(total))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def free_running(engines: dict, tok, ids: list[int], tokens: int) -> int:
    """Greedy tokens both engines choose alike before they first differ (``tokens`` if never)."""
    from appliance.positions import layout_of

    layout = layout_of(ids, tok.special.bos, tok.special.gmask, tok.special.mask)
    seqs = {k: e.start() for k, e in engines.items()}
    chosen = {k: int(s.prefill(np.array(ids), layout.position_ids(), layout.mask()).argmax()) for k, s in seqs.items()}
    total = len(ids)
    for n in range(tokens):
        if chosen["fp32"] != chosen["fp16"]:
            return n
        total += 1
        chosen = {k: int(s.step(chosen[k], layout.step_position(total)).argmax()) for k, s in seqs.items()}
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/streamchat-kv-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=64, help="teacher-forced steps per prompt for the agreement")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and bundles")
    args = parser.parse_args()
    from appliance.bundle import Bundle
    from appliance.engines import warm_up
    from appliance.kernels import describe
    from model_export.export import export_bundle
    from model_export.synthetic import write_checkpoint
    from model_export.verify import VERIFY_PROMPTS, compare_engines

    ckpt = args.work / f"synthetic-{args.layers}"
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, args.layers)
    bundles = {}
    for kind in KINDS:
        path = args.work / f"bundle-{args.layers}-kv{kind}"
        if not path.exists():
            export_bundle(ckpt, path, quant="int4", kv_cache=kind)
        bundles[kind] = Bundle.open(path, full_check=False)
    engines = {kind: bundle.engine() for kind, bundle in bundles.items()}
    tok = bundles["fp32"].tokenizer()
    for engine in engines.values():
        warm_up(engine, tok.special.bos, tok.special.gmask)
    rng = np.random.default_rng(0)
    text = rng.integers(tok.num_image_tokens + 100, tok.num_image_tokens + 1000, size=4096).tolist()
    prompt = text[: PROMPT - 2] + [tok.special.gmask, tok.special.bos]
    rounds = []
    for _ in range(args.rounds):
        for kind, engine in engines.items():
            row = {"cache": kind, "prefill_tokens_s": PROMPT / min(timed_prefill(engine, tok, prompt)[3] for _ in range(2))}
            if engine.prefill.name != "graph":
                row["graph_prefill_tokens_s"] = PROMPT / min(timed_prefill(engine, tok, prompt, graph=True)[3]
                                                             for _ in range(2))
            row["decode_ms"] = {c: decode_ms(engine, tok, text, c) for c in CONTEXTS}
            rounds.append(row)
            print(json.dumps(row), flush=True)
    agreement = compare_engines(engines["fp16"], engines["fp32"], tok, VERIFY_PROMPTS, args.steps)
    alike = [free_running(engines, tok, tok.encode_prompt(p), args.steps) for p in VERIFY_PROMPTS]
    print(json.dumps({"layers": args.layers, "kernels": describe(), "threads": engines["fp32"].threads,
                      "prefill_path": engines["fp32"].prefill.name, "teacher_forced": agreement,
                      "positions": len(VERIFY_PROMPTS) * (args.steps + 1), "free_running_alike": alike}))
    if not args.keep:
        del engines
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
