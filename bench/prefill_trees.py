"""Prompt speed of different StreamChat checkouts on the same machine, in turns: "is it faster than the code was?"

    python bench/prefill_trees.py --tree OLD_CHECKOUT:BUNDLE[:KERNEL] --tree NEW_CHECKOUT:BUNDLE[:KERNEL] ...
                                  [--rounds 3] [--repeats 3] [--prompt 128]

Each tree is a checkout whose C kernel is built in place (``python setup.py build_ext --inplace`` in it) and the bundle
one that checkout's export wrote (a bundle format may change between them). Every round runs each tree in a fresh
process (``PYTHONPATH`` = the checkout, ``STREAMCHAT_KERNEL`` = KERNEL when given), which opens the bundle, prefills
one prompt of ``--prompt`` tokens ``--repeats`` times and reports its best; the read bandwidth is measured before each
round, so a busy machine shows. The table gives prompt tokens/s and each tree's ratio to the first tree of its round.
The child only uses what every checkout since the prompt kernel has (``Bundle.open``, ``engine.start``,
``seq.prefill``), so old code runs unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from speed import read_bandwidth_gbs

CHILD = """
import json, sys, time
import numpy as np
import appliance
from appliance.bundle import Bundle
from appliance.positions import layout_of

bundle, repeats, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
engine, tok = (lambda b: (b.engine(), b.tokenizer()))(Bundle.open(bundle, full_check=False))
sp = tok.special
ids = np.random.default_rng(0).integers(tok.num_image_tokens + 100, tok.num_image_tokens + 1000, size=length - 2)
ids = ids.tolist() + [sp.gmask, sp.bos]
layout = layout_of(ids, sp.bos, sp.gmask, sp.mask)
times = []
for _ in range(repeats):
    seq = engine.start()
    start = time.perf_counter()
    seq.prefill(np.array(ids), layout.position_ids(), layout.mask())
    times.append(time.perf_counter() - start)
    del seq
print(json.dumps({"code": appliance.__file__, "path": getattr(getattr(engine, "prefill", None), "name", "?"),
                  "seconds": times}))
"""


def parse_tree(spec: str) -> tuple[str, str, str]:
    """``CHECKOUT:BUNDLE[:KERNEL]`` -> (checkout, bundle, kernel or "")."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise SystemExit(f"--tree takes CHECKOUT:BUNDLE[:KERNEL], not {spec!r}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def run_tree(tree: str, bundle: str, kernel: str, repeats: int, prompt: int) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "STREAMCHAT_CACHE_DIR": "/tmp/streamchat-bench-cache"}
    env.pop("STREAMCHAT_KERNEL", None)
    if kernel:
        env["STREAMCHAT_KERNEL"] = kernel
    proc = subprocess.run([sys.executable, "-c", CHILD, bundle, str(repeats), str(prompt)], capture_output=True,
                          text=True, env=env, cwd=tree)
    if proc.returncode:
        raise SystemExit(f"{tree}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'failed'}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(out["code"]).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"{tree}: the child imported StreamChat from {out['code']}, not from the tree")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, metavar="CHECKOUT:BUNDLE[:KERNEL]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="prefills per process; the best counts")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    args = parser.parse_args()
    specs = [parse_tree(spec) for spec in args.tree]
    rows = []
    for round_ in range(1, args.rounds + 1):
        bandwidth = read_bandwidth_gbs(256, repeats=3)
        for tree, bundle, kernel in specs:
            out = run_tree(tree, bundle, kernel, args.repeats, args.prompt)
            rows.append({"round": round_, "bandwidth_gbs": bandwidth, "tree": tree, "bundle": bundle,
                         "kernel": kernel or "CPUID", **out, "tokens_per_s": args.prompt / min(out["seconds"])})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| round | GB/s before | checkout | bundle | STREAMCHAT_KERNEL | prompt path | best of {args.repeats} s | "
          f"{args.prompt}-token prompt tokens/s | ratio to the first |")
    print("|" + "---|" * 9)
    for r in rows:
        first = next(x for x in rows if x["round"] == r["round"])
        bundle = "/".join(Path(r["bundle"]).parts[-2:])  # a bundle's folder and its parent tell exports apart
        print(f"| {r['round']} | {r['bandwidth_gbs']:.1f} | {r['tree']} | {bundle} | {r['kernel']} | "
              f"{r['path']} | {min(r['seconds']):.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / first['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
