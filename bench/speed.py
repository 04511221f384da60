"""Speed and memory of the cpu target on ChatGLM-6B's real shapes (random weights), against the memory-bandwidth floor.

    python bench/speed.py [--layers 2 8 28] [--variants] [--reuse-bundles] [--work /tmp/streamchat-bench]

For each layer count: writes a full-width synthetic checkpoint (cached), exports it to INT4 (block 128, accuracy
level 4, INT8 lm_head shared with the embedding) in a child process (export time, export peak RSS), then, in another
child process, measures time to first token for 16/128/512-token prompts (and, for comparison, with the graph's own
prefill instead of the AVX2 INT4 prompt kernel), decode ms/token at context 128/1024/2000 and the runtime's peak RSS
over all of that plus a conversation filled to the full 2048-token context (checked against weights + KV cache +
15%). Layer counts short of the real 28 are fitted as ``a + b * layers`` and extrapolated. The floor is the bytes a
decode step must read (weights + KV cache) over the read bandwidth measured right before and after that decode run
(on a shared machine it moves from minute to minute: docs/performance.md). Results of bench/chatglm_cpp.py in
``--work`` (chatglm-cpp-*.json) add the ratios to chatglm.cpp and its points on the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from operator import itemgetter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REAL_LAYERS = 28
CONTEXTS = (128, 1024, 2000)
PROMPTS = (16, 128, 512)
FULL_CONTEXT = 2048
KV_BYTES_PER_TOKEN_LAYER = 2 * 4096 * 4  # fp32 K and V
MEMORY_SLACK = 1.15
DECODE_STEPS = 24  # per context; the first two are left out of the median
BANDWIDTH_PROBE_MB = 256  # measured around each decode run: 8x this machine's L3, small beside the model's RSS


def read_bandwidth_gbs(size_mb: int = 1024, threads: int = 2, repeats: int = 5) -> float:
    """Best of ``repeats`` parallel sums over a buffer much larger than the caches (each thread sums its half)."""
    data = np.ones(size_mb * (1 << 20) // 8, dtype=np.float64)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def peak_rss_gb() -> float:
    """This process's peak resident set in 1e9 bytes (ru_maxrss is in KiB on Linux), the unit of the memory bound."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def child_export(checkpoint: str, out: str, group: int, accuracy: int, embeddings: str) -> None:
    from model_export.export import export_bundle

    start = time.perf_counter()
    export_bundle(checkpoint, out, quant="int4", group_size=group, accuracy_level=accuracy, embeddings=embeddings,
                  force=True)
    print(json.dumps({"export_s": time.perf_counter() - start,
                      "export_peak_rss_gb": peak_rss_gb()}))


def child_run(bundle_dir: str, contexts: list[int], prompts: list[int]) -> None:
    from appliance.bundle import Bundle
    from appliance.engines import warm_up
    from appliance.positions import layout_of

    bundle = Bundle.open(bundle_dir, full_check=False)
    engine, tok = bundle.engine(), bundle.tokenizer()
    special = tok.special
    rng = np.random.default_rng(0)
    text_ids = rng.integers(tok.num_image_tokens + 100, tok.num_image_tokens + 1000, size=4096).tolist()

    def prefill(length: int, graph: bool = False):
        """Time one prompt of ``length`` tokens on the engine's own prefill path, or on the graph's (``graph``)."""
        ids = text_ids[: length - 2] + [special.gmask, special.bos]
        layout = layout_of(ids, special.bos, special.gmask, special.mask)
        seq = (engine.prefill_paths(np.array(ids), layout.mask())["graph"] if graph else engine).start()
        start = time.perf_counter()
        seq.prefill(np.array(ids), layout.position_ids(), layout.mask())
        return seq, layout, time.perf_counter() - start

    out = {"ttft_ms": {}, "ttft_graph_ms": {}, "decode_ms": {}, "decode_bandwidth_gbs": {},
           "load_peak_rss_gb": peak_rss_gb()}
    warm_up(engine, special.bos, special.gmask)  # as the app does when it loads
    for length in prompts:
        out["ttft_ms"][length] = min(prefill(length)[2] for _ in range(2)) * 1000
        if engine.prefill.name != "graph":  # the AVX2 INT4 prompt path applies: the graph's own prefill, for comparison
            out["ttft_graph_ms"][length] = min(prefill(length, graph=True)[2] for _ in range(2)) * 1000
    for context in contexts:
        seq, layout, _ = prefill(context - DECODE_STEPS // 2)  # the steps straddle the context
        total, times = context - DECODE_STEPS // 2, []
        before = read_bandwidth_gbs(BANDWIDTH_PROBE_MB, repeats=3)
        for _ in range(DECODE_STEPS):
            total += 1
            start = time.perf_counter()
            seq.step(text_ids[total % 4096], layout.step_position(total))
            times.append(time.perf_counter() - start)
        out["decode_ms"][context] = float(np.median(times[2:])) * 1000
        out["decode_bandwidth_gbs"][context] = (before + read_bandwidth_gbs(BANDWIDTH_PROBE_MB, repeats=3)) / 2
        del seq
    seq, layout, _ = prefill(FULL_CONTEXT - 16)  # a conversation filling the whole context window
    for total in range(FULL_CONTEXT - 15, FULL_CONTEXT + 1):
        seq.step(text_ids[total % 4096], layout.step_position(total))
    out["peak_rss_gb"] = peak_rss_gb()
    out["threads"] = engine.threads
    print(json.dumps(out))


def _child(*args: str) -> dict:
    env = {**os.environ, "STREAMCHAT_CACHE_DIR": "/tmp/streamchat-bench-cache"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def weight_bytes(bundle: Path) -> int:
    quant = json.loads((bundle / "manifest.json").read_text())["quant"]
    return quant["linear_bytes"] + quant["table_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--work", type=Path, default=Path("/tmp/streamchat-bench"))
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "performance.png")
    parser.add_argument("--variants", action="store_true", help="also compare block sizes / accuracy levels / lm_head")
    parser.add_argument("--reuse-bundles", action="store_true",
                        help="measure the runtime again on bundles exported by an earlier run (keeps its export numbers)")
    args = parser.parse_args()
    results = args.work / "results.json"  # earlier runs' rows for other layer counts join the fit
    earlier = json.loads(results.read_text()) if results.exists() else []
    key = itemgetter("layers", "group", "accuracy", "lm_head")
    from model_export.synthetic import write_checkpoint

    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth: {bandwidth:.1f} GB/s (2 threads, 1 GiB buffer, best of 5)")
    from appliance.kernels import describe

    print(f"kernels: {describe()}")  # which paths the runs below take (STREAMCHAT_KERNEL forces one)
    configs = [(128, 4, "int8")]
    if args.variants:
        configs += [(32, 4, "int8"), (256, 4, "int8"), (128, 4, "int4")]  # accuracy level 0: docs/performance.md
    rows = []
    for layers in args.layers:
        ckpt = args.work / f"synthetic-{layers}"
        if not (ckpt / "config.json").exists():
            write_checkpoint(ckpt, layers)
        for group, accuracy, emb in configs if layers == args.layers[0] else configs[:1]:
            bundle = args.work / f"bundle-{layers}-g{group}-a{accuracy}-{emb}"
            before = next((r for r in earlier if key(r) == (layers, group, accuracy, emb)), None)
            if args.reuse_bundles and before and bundle.exists():
                exported = {k: before[k] for k in ("export_s", "export_peak_rss_gb")}
            else:
                exported = _child("--export", str(ckpt), str(bundle), str(group), str(accuracy), emb)
            run = _child("--run", str(bundle))
            rows.append({"layers": layers, "group": group, "accuracy": accuracy, "lm_head": emb, "bandwidth_gbs": bandwidth,
                         "bundle_gb": sum(f.stat().st_size for f in bundle.iterdir()) / 1e9,
                         "weights_gb": weight_bytes(bundle) / 1e9, **exported, **run})
            print(json.dumps(rows[-1]), flush=True)
    measured = {key(r) for r in rows}
    rows += [r for r in earlier if key(r) not in measured]
    rows.sort(key=key)
    results.write_text(json.dumps(rows, indent=1))
    theirs = [json.loads(f.read_text())[1] for f in sorted(args.work.glob("chatglm-cpp-*.json"))]  # the 128 prompt
    report(rows, bandwidth, args.plot, theirs)


def floor_ms(weights_gb: float, layers: int, context: int, bandwidth: float) -> float:
    return (weights_gb + kv_gb(layers, context)) / bandwidth * 1000


def kv_gb(layers: int, context: int) -> float:
    return layers * context * KV_BYTES_PER_TOKEN_LAYER / 1e9


def report(rows: list[dict], bandwidth: float, plot: Path, chatglm_cpp: list[dict] | None = None) -> None:
    default = [r for r in rows if (r["group"], r["accuracy"], r["lm_head"]) == (128, 4, "int8")]
    print("\n| layers | block | acc | lm_head | bundle GB | export s | export peak RSS GB | TTFT 16/128/512 ms | "
          "TTFT graph prefill ms | decode ms/token @128/1024/2000 | GB/s @128/1024/2000 | floor ms @128/1024/2000 | "
          f"share of floor | peak RSS GB (load / run) | weights + KV@{FULL_CONTEXT} + 15% GB |")
    print("|" + "---|" * 15)
    for r in rows:  # each decode time against the bandwidth measured around it (older rows: at the run's start)
        bandwidths = [r.get("decode_bandwidth_gbs", {}).get(str(c), r.get("bandwidth_gbs", bandwidth)) for c in CONTEXTS]
        floors = [floor_ms(r["weights_gb"], r["layers"], c, bw) for c, bw in zip(CONTEXTS, bandwidths, strict=True)]
        ttft = "/".join(f"{r['ttft_ms'][str(p)]:.0f}" for p in PROMPTS)
        graph = "/".join(f"{r['ttft_graph_ms'][str(p)]:.0f}" for p in PROMPTS) if r.get("ttft_graph_ms") else "-"
        dec = "/".join(f"{r['decode_ms'][str(c)]:.1f}" for c in CONTEXTS)
        share = "/".join(f"{f / r['decode_ms'][str(c)]:.0%}" for f, c in zip(floors, CONTEXTS, strict=True))
        bound = (r["weights_gb"] + kv_gb(r["layers"], FULL_CONTEXT)) * MEMORY_SLACK
        print(f"| {r['layers']} | {r['group']} | {r['accuracy']} | {r['lm_head']} | {r['bundle_gb']:.2f} | "
              f"{r['export_s']:.0f} | {r['export_peak_rss_gb']:.2f} | {ttft} | {graph} | {dec} | "
              f"{'/'.join(f'{bw:.1f}' for bw in bandwidths)} | "
              f"{'/'.join(f'{f:.0f}' for f in floors)} | {share} | {r.get('load_peak_rss_gb', 0):.2f} / "
              f"{r['peak_rss_gb']:.2f} | {bound:.2f} |")
    for theirs in chatglm_cpp or []:  # its prompt of about 128 tokens against ours of 128
        ours = next((r for r in default if r["layers"] == theirs["layers"]), None)
        if ours:
            rate = 128 / ours["ttft_ms"]["128"] * 1000
            print(f"{theirs['layers']} layers: prefill {rate:.1f} prompt tokens/s (128 tokens) vs chatglm.cpp q4_0 "
                  f"{theirs['prompt_tokens_per_s']:.1f} ({theirs['prompt_tokens']} tokens): "
                  f"{rate / theirs['prompt_tokens_per_s']:.2f}x; decode {ours['decode_ms']['128']:.0f} vs "
                  f"{theirs['decode_ms']:.0f} ms/token: {theirs['decode_ms'] / ours['decode_ms']['128']:.2f}x")
    xs = np.array(sorted({r["layers"] for r in default}), dtype=float)
    if len(xs) < 2:
        return
    measured = REAL_LAYERS in xs  # then the fit only draws the plot's lines
    say = (lambda *_: None) if measured else print
    say(f"\nFitted over layers {xs.astype(int).tolist()} (least squares, a + b*layers) and evaluated at {REAL_LAYERS}:")
    say("| context | decode ms/token (fit) | floor ms | share of floor | tokens/s |")
    say("|---|---|---|---|---|")
    w_fit = np.polyfit(xs, [r["weights_gb"] for r in default], 1)
    weights_28 = float(np.polyval(w_fit, REAL_LAYERS))
    fits = {}
    for context in CONTEXTS:
        b, a = np.polyfit(xs, [r["decode_ms"][str(context)] for r in default], 1)
        ms = a + b * REAL_LAYERS
        fl = floor_ms(weights_28, REAL_LAYERS, context, bandwidth)
        fits[context] = (a, b)
        say(f"| {context} | {ms:.0f} (= {a:.1f} + {b:.2f} x {REAL_LAYERS}) | {fl:.0f} | {fl / ms:.0%} | {1000 / ms:.1f} |")
    ttft = {p: np.polyfit(xs, [r["ttft_ms"][str(p)] for r in default], 1) for p in PROMPTS}
    for p in PROMPTS:
        b, a = ttft[p]
        ms = a + b * REAL_LAYERS
        say(f"TTFT {p}-token prompt at {REAL_LAYERS} layers: {ms / 1000:.2f} s ({p / (ms / 1000):.0f} prompt tokens/s)")
    say(f"INT4 weights at {REAL_LAYERS} layers: {weights_28:.2f} GB")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    layers = np.arange(1, REAL_LAYERS + 1)
    for context in CONTEXTS:
        a, b = fits[context]
        left.plot(layers, a + b * layers, label=f"decode, context {context} (fit)")
        left.scatter(xs, [r["decode_ms"][str(context)] for r in default])
    left.plot(layers, [floor_ms(float(np.polyval(w_fit, n)), n, 128, bandwidth) for n in layers], "k--",
              label="bandwidth floor, context 128")
    for theirs in chatglm_cpp or []:
        left.scatter([theirs["layers"]], [theirs["decode_ms"]], marker="x", color="k", label="chatglm.cpp q4_0, decode")
        right.scatter([theirs["layers"]], [theirs["prompt_ms"] / 1000], marker="x", color="k",
                      label=f"chatglm.cpp q4_0, {theirs['prompt_tokens']}-token prompt")
    left.set_xlabel("layers")
    left.set_ylabel("ms / token")
    left.legend(fontsize=8)
    left.set_title("INT4 decode on full-width ChatGLM-6B shapes")
    with_graph = all(r.get("ttft_graph_ms") for r in default)
    for p in PROMPTS:
        b, a = ttft[p]
        line = right.plot(layers, (a + b * layers) / 1000, label=f"{p}-token prompt")[0]
        if with_graph:
            b, a = np.polyfit(xs, [r["ttft_graph_ms"][str(p)] for r in default], 1)
            right.plot(layers, (a + b * layers) / 1000, "--", color=line.get_color(), label=f"{p}, graph prefill")
    right.set_xlabel("layers")
    right.set_ylabel("time to first token (s)")
    right.legend(fontsize=8)
    right.set_title("prefill")
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    print(f"plot: {plot}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--export":
        child_export(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--run":
        child_run(sys.argv[2], list(CONTEXTS), list(PROMPTS))
    else:
        main()
