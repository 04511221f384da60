"""Speed and memory of the cpu target on ChatGLM-6B's real shapes (random weights), against the memory-bandwidth floor.

    python bench/speed.py [--layers 2 8 28] [--variants] [--reuse-bundles] [--work /tmp/streamchat-bench]

For each layer count: writes a full-width synthetic checkpoint (cached), exports it to INT4 (block 128, accuracy
level 4, INT8 lm_head shared with the embedding) in a child process (export time, export peak RSS), then, in another
child process, measures time to first token for 16/128/512-token prompts (and, for comparison, with the graph's own
prefill instead of the AVX2 INT4 prompt kernel), decode ms/token at context 128/1024/2000 and the runtime's peak RSS
over all of that plus a conversation filled to the full 2048-token context (checked against weights + KV cache, in
the bundle's cache type, + 10%). Layer counts short of the real 28 are fitted as ``a + b * layers`` and extrapolated.
The floor is the bytes a decode step must read (weights + KV cache) over the read bandwidth measured right before and
after that decode run (on a shared machine it moves from minute to minute: docs/performance.md). Results of
bench/chatglm_cpp.py in ``--work`` (chatglm-cpp-*.json) add the ratios to chatglm.cpp and its points on the plot.

    python bench/speed.py --compare BUNDLE[:KERNEL] ... [--rounds 2] [--prompts 128] [--contexts 128 2000] [--no-full]

measures existing bundles in turns instead (each under ``STREAMCHAT_KERNEL=KERNEL`` when given), ``--rounds`` times,
with the read bandwidth measured before and after each child run, and prints which kernels ran, the resident set by
stage (total, anonymous, file-backed) and the memory bound of each.
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
KV_VALUES_PER_TOKEN_LAYER = 2 * 4096  # K and V, in the bundle's graphs.kv_cache type
MEMORY_SLACK = 1.10
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


def rss_now() -> dict[str, float]:
    """This process's resident set now in GB: VmRSS, RssAnon (heap, arenas, KV cache), RssFile (mapped bundle)."""
    lines = (line.partition(":") for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(v.split()[0]) * 1024 / 1e9 for k, _, v in lines if k in ("VmRSS", "RssAnon", "RssFile")}


class StageRss:
    """The highest resident set sampled (every 20 ms) in each named stage: where ru_maxrss's single peak comes from."""

    def __init__(self) -> None:
        self.stage, self.peaks = "load", {}
        threading.Thread(target=self._sample, daemon=True).start()

    def enter(self, stage: str) -> None:
        self.stage = stage

    def _sample(self) -> None:
        while True:
            now, stage = rss_now(), self.stage
            if now["VmRSS"] > self.peaks.get(stage, {}).get("VmRSS", 0.0):
                self.peaks[stage] = now
            time.sleep(0.02)


def child_export(checkpoint: str, out: str, group: int, accuracy: int, embeddings: str) -> None:
    from model_export.export import export_bundle

    start = time.perf_counter()
    export_bundle(checkpoint, out, quant="int4", group_size=group, accuracy_level=accuracy, embeddings=embeddings,
                  force=True)
    print(json.dumps({"export_s": time.perf_counter() - start,
                      "export_peak_rss_gb": peak_rss_gb()}))


def probe_bandwidth_gbs() -> float:
    """``read_bandwidth_gbs(BANDWIDTH_PROBE_MB)`` in a process of its own: in the measured process its buffer was
    0.27 GB of a 28-layer run's peak resident set, which is the runtime's figure, not the bench's."""
    code = f"from speed import read_bandwidth_gbs; print(read_bandwidth_gbs({BANDWIDTH_PROBE_MB}, repeats=3))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent)
    return float(run.stdout)


def child_run(bundle_dir: str, contexts: list[int], prompts: list[int], full: bool = True) -> None:
    stages = StageRss()
    from appliance.bundle import Bundle
    from appliance.engines import warm_up
    from appliance.kernels import describe
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
           "load_peak_rss_gb": peak_rss_gb(), "kernels": describe(), "prefill_path": engine.prefill.name}
    stages.enter("warm-up")
    warm_up(engine, special.bos, special.gmask)  # as the app does when it loads
    stages.enter("prompts")
    for length in prompts:
        out["ttft_ms"][length] = min(prefill(length)[2] for _ in range(2)) * 1000
    for context in contexts:
        stages.enter(f"decode {context}")
        seq, layout, _ = prefill(context - DECODE_STEPS // 2)  # the steps straddle the context
        total, times = context - DECODE_STEPS // 2, []
        before = probe_bandwidth_gbs()
        for _ in range(DECODE_STEPS):
            total += 1
            start = time.perf_counter()
            seq.step(text_ids[total % 4096], layout.step_position(total))
            times.append(time.perf_counter() - start)
        out["decode_ms"][context] = float(np.median(times[2:])) * 1000
        out["decode_bandwidth_gbs"][context] = (before + probe_bandwidth_gbs()) / 2
        del seq
    if full:
        stages.enter(f"prefill {FULL_CONTEXT - 16}")
        seq, layout, _ = prefill(FULL_CONTEXT - 16)  # a conversation filling the whole context window
        stages.enter(f"decode to {FULL_CONTEXT}")
        for total in range(FULL_CONTEXT - 15, FULL_CONTEXT + 1):
            seq.step(text_ids[total % 4096], layout.step_position(total))
    time.sleep(0.05)  # one more sample of the last stage
    out["peak_rss_gb"] = peak_rss_gb()
    out["rss_by_stage_gb"] = dict(stages.peaks)
    if engine.prefill.name != "graph":  # the INT4 prompt path applies: the graph's own prefill, for comparison, after
        for length in prompts:          # the peak is read (beside the kernel decoder it opens a second weight copy)
            out["ttft_graph_ms"][length] = min(prefill(length, graph=True)[2] for _ in range(2)) * 1000
    out["threads"] = engine.threads
    print(json.dumps(out))


def _child(*args: str, kernel: str = "") -> dict:
    env = {**os.environ, "STREAMCHAT_CACHE_DIR": "/tmp/streamchat-bench-cache"}
    if kernel:
        from appliance.kernels.native import ENV

        env[ENV] = kernel
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def weight_bytes(bundle: Path) -> int:
    quant = json.loads((bundle / "manifest.json").read_text())["quant"]
    return quant["linear_bytes"] + quant["table_bytes"]


def kv_cache(bundle: Path) -> str:
    """The bundle's KV cache type (bundles exported before the manifest said: fp32)."""
    from appliance.model_config import UNMARKED_KV_CACHE

    return json.loads((bundle / "manifest.json").read_text())["graphs"].get("kv_cache", UNMARKED_KV_CACHE)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--work", type=Path, default=Path("/tmp/streamchat-bench"))
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "performance.png")
    parser.add_argument("--variants", action="store_true", help="also compare block sizes / accuracy levels / lm_head")
    parser.add_argument("--reuse-bundles", action="store_true",
                        help="measure the runtime again on bundles exported by an earlier run (keeps its export numbers)")
    parser.add_argument("--compare", nargs="+", metavar="BUNDLE[:KERNEL]",
                        help="measure these bundles in turns (under STREAMCHAT_KERNEL=KERNEL when given); no export")
    parser.add_argument("--rounds", type=int, default=2, help="with --compare")
    parser.add_argument("--prompts", type=int, nargs="+", default=list(PROMPTS), help="with --compare")
    parser.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS), help="with --compare")
    parser.add_argument("--no-full", action="store_true", help="with --compare: skip the full-context conversation")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare, args.rounds, args.prompts, args.contexts, not args.no_full)
        return
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
                         "weights_gb": weight_bytes(bundle) / 1e9, "kv_cache": kv_cache(bundle), **exported, **run})
            print(json.dumps(rows[-1]), flush=True)
    measured = {key(r) for r in rows}
    rows += [r for r in earlier if key(r) not in measured]
    rows.sort(key=key)
    results.write_text(json.dumps(rows, indent=1))
    theirs = [json.loads(f.read_text())[1] for f in sorted(args.work.glob("chatglm-cpp-*.json"))]  # the 128 prompt
    report(rows, bandwidth, args.plot, theirs)


def compare(specs: list[str], rounds: int, prompts: list[int], contexts: list[int], full: bool) -> None:
    """``--compare``: each bundle (and kernel) in turn, ``rounds`` times, bandwidth measured around each child run."""
    plan = json.dumps({"prompts": prompts, "contexts": contexts, "full": full})
    rows = []
    for round_ in range(1, rounds + 1):
        for spec in specs:
            bundle, _, kernel = spec.partition(":")
            before = read_bandwidth_gbs(BANDWIDTH_PROBE_MB, repeats=3)
            run = _child("--run", bundle, plan, kernel=kernel)
            around = (before, read_bandwidth_gbs(BANDWIDTH_PROBE_MB, repeats=3))
            rows.append({"round": round_, "bundle": bundle, "kernel": kernel or "CPUID", "bandwidth_gbs": around,
                         "weights_gb": weight_bytes(Path(bundle)) / 1e9, "kv_cache": kv_cache(Path(bundle)), **run})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| round | bundle | KV cache | STREAMCHAT_KERNEL | prefill path | GB/s before/after | "
          f"TTFT ms {'/'.join(map(str, prompts))} (prompt tokens/s) | graph prefill ms | "
          f"decode ms/token @{'/'.join(map(str, contexts))} | GB/s around each decode | share of floor | "
          f"peak RSS GB (load / run) | weights + KV@{FULL_CONTEXT} + 10% GB |")
    print("|" + "---|" * 13)
    for r in rows:
        layers = json.loads((Path(r["bundle"]) / "manifest.json").read_text())["model"]["config"]["num_layers"]
        ttft = "/".join(f"{r['ttft_ms'][str(p)]:.0f} ({p / r['ttft_ms'][str(p)] * 1000:.1f})" for p in prompts)
        graph = "/".join(f"{r['ttft_graph_ms'][str(p)]:.0f}" for p in prompts) if r["ttft_graph_ms"] else "-"
        bws = [r["decode_bandwidth_gbs"][str(c)] for c in contexts]
        decode = [r["decode_ms"][str(c)] for c in contexts]
        share = [floor_ms(r["weights_gb"], layers, c, bw, r["kv_cache"]) / r["decode_ms"][str(c)]
                 for c, bw in zip(contexts, bws, strict=True)]
        bound = (r["weights_gb"] + kv_gb(layers, FULL_CONTEXT, r["kv_cache"])) * MEMORY_SLACK
        print(f"| {r['round']} | {Path(r['bundle']).name} | {r['kv_cache']} | {r['kernel']} | {r['prefill_path']} | "
              f"{r['bandwidth_gbs'][0]:.1f}/{r['bandwidth_gbs'][1]:.1f} | {ttft} | {graph} | "
              f"{'/'.join(f'{ms:.1f}' for ms in decode) or '-'} | "
              f"{'/'.join(f'{b:.1f}' for b in bws) or '-'} | {'/'.join(f'{x:.0%}' for x in share) or '-'} | "
              f"{r['load_peak_rss_gb']:.2f} / {r['peak_rss_gb']:.2f} | {bound:.2f} |")
    for r in rows:
        print(f"round {r['round']} {Path(r['bundle']).name} {r['kernel']}: kernels: {r['kernels']}")
        for stage, rss in r["rss_by_stage_gb"].items():
            print(f"  {stage}: peak sampled RSS {rss['VmRSS']:.2f} GB (anonymous {rss['RssAnon']:.2f}, "
                  f"file-backed {rss['RssFile']:.2f})")


def floor_ms(weights_gb: float, layers: int, context: int, bandwidth: float, cache: str = "fp32") -> float:
    return (weights_gb + kv_gb(layers, context, cache)) / bandwidth * 1000


def kv_gb(layers: int, context: int, cache: str = "fp32") -> float:
    """The KV cache of ``layers`` at ``context`` positions in GB; ``cache``: a row's kv_cache (older rows: fp32)."""
    from appliance.model_config import KV_CACHE_DTYPES

    return layers * context * KV_VALUES_PER_TOKEN_LAYER * KV_CACHE_DTYPES[cache].itemsize / 1e9


def report(rows: list[dict], bandwidth: float, plot: Path, chatglm_cpp: list[dict] | None = None) -> None:
    default = [r for r in rows if (r["group"], r["accuracy"], r["lm_head"]) == (128, 4, "int8")]
    print("\n| layers | block | acc | lm_head | bundle GB | export s | export peak RSS GB | TTFT 16/128/512 ms | "
          "TTFT graph prefill ms | decode ms/token @128/1024/2000 | GB/s @128/1024/2000 | floor ms @128/1024/2000 | "
          f"share of floor | peak RSS GB (load / run) | KV cache | weights + KV@{FULL_CONTEXT} + 10% GB |")
    print("|" + "---|" * 16)
    for r in rows:  # each decode time against the bandwidth measured around it (older rows: at the run's start)
        bandwidths = [r.get("decode_bandwidth_gbs", {}).get(str(c), r.get("bandwidth_gbs", bandwidth)) for c in CONTEXTS]
        cache = r.get("kv_cache", "fp32")
        floors = [floor_ms(r["weights_gb"], r["layers"], c, bw, cache) for c, bw in zip(CONTEXTS, bandwidths, strict=True)]
        ttft = "/".join(f"{r['ttft_ms'][str(p)]:.0f}" for p in PROMPTS)
        graph = "/".join(f"{r['ttft_graph_ms'][str(p)]:.0f}" for p in PROMPTS) if r.get("ttft_graph_ms") else "-"
        dec = "/".join(f"{r['decode_ms'][str(c)]:.1f}" for c in CONTEXTS)
        share = "/".join(f"{f / r['decode_ms'][str(c)]:.0%}" for f, c in zip(floors, CONTEXTS, strict=True))
        bound = (r["weights_gb"] + kv_gb(r["layers"], FULL_CONTEXT, cache)) * MEMORY_SLACK
        print(f"| {r['layers']} | {r['group']} | {r['accuracy']} | {r['lm_head']} | {r['bundle_gb']:.2f} | "
              f"{r['export_s']:.0f} | {r['export_peak_rss_gb']:.2f} | {ttft} | {graph} | {dec} | "
              f"{'/'.join(f'{bw:.1f}' for bw in bandwidths)} | "
              f"{'/'.join(f'{f:.0f}' for f in floors)} | {share} | {r.get('load_peak_rss_gb', 0):.2f} / "
              f"{r['peak_rss_gb']:.2f} | {cache} | {bound:.2f} |")
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
        fl = floor_ms(weights_28, REAL_LAYERS, context, bandwidth, default[-1].get("kv_cache", "fp32"))
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
    cache = default[-1].get("kv_cache", "fp32")
    left.plot(layers, [floor_ms(float(np.polyval(w_fit, n)), n, 128, bandwidth, cache) for n in layers], "k--",
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
        plan = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
        child_run(sys.argv[2], plan.get("contexts", list(CONTEXTS)), plan.get("prompts", list(PROMPTS)),
                  plan.get("full", True))
    else:
        main()
