"""chatglm.cpp (q4_0) on ChatGLM-6B's real shapes, to compare with our runtime on the same machine at the same time.

    python bench/chatglm_cpp.py --main /path/to/chatglm.cpp/build/bin/main [--layers 28] [--work /tmp/streamchat-bench]
                                [--ours BUNDLE --rounds 2]

Writes a GGML file in chatglm.cpp's ChatGLM-6B layout (the format its convert.py writes: magic, model type, config
version 2, tokenizer proto, named tensors aligned to 16 bytes) with random q4_0 weights (blocks of 32: fp16 scale and
16 bytes of nibbles; the embedding doubles as lm_head, as chatglm.cpp requires), then runs ``main -v`` in generate mode
and prints prompt tokens/s and decode ms/token as chatglm.cpp's own PerfStreamer reports them. The tokenizer is the
synthetic checkpoint's (``model_export.synthetic``), so prompts cost what they cost there. With ``--ours`` it
alternates with our engine on that bundle (same prompt length, 16 decode steps, after the warm-up the app does when
it loads, as in bench/speed.py), so the ratio comes from one stretch of this noisy machine. How to build ``main`` from
source snapshots, without network, and with which commits and flags: docs/performance.md, "Building chatglm.cpp
without network".
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

Q4_0, F32 = 2, 0
BLOCK, BLOCK_BYTES = 32, 18
ALIGN = 16


def tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, ggml type) in the order chatglm.cpp's ChatGLM-6B loader reads them."""
    h, inner, out = cfg["hidden_size"], cfg["inner_hidden_size"], []
    out.append(("transformer.word_embeddings.weight", (cfg["vocab_size"], h), Q4_0))
    for n in range(cfg["num_layers"]):
        p = f"transformer.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,), F32), (p + "input_layernorm.bias", (h,), F32),
                (p + "attention.query_key_value.weight", (3 * h, h), Q4_0),
                (p + "attention.query_key_value.bias", (3 * h,), F32),
                (p + "attention.dense.weight", (h, h), Q4_0), (p + "attention.dense.bias", (h,), F32),
                (p + "post_attention_layernorm.weight", (h,), F32), (p + "post_attention_layernorm.bias", (h,), F32),
                (p + "mlp.dense_h_to_4h.weight", (inner, h), Q4_0), (p + "mlp.dense_h_to_4h.bias", (inner,), F32),
                (p + "mlp.dense_4h_to_h.weight", (h, inner), Q4_0), (p + "mlp.dense_4h_to_h.bias", (h,), F32)]
    out += [("transformer.final_layernorm.weight", (h,), F32), ("transformer.final_layernorm.bias", (h,), F32)]
    return out


def write_ggml(cfg: dict, tokenizer_model: Path, out: Path) -> None:
    rng = np.random.default_rng(0)
    scale = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
    with open(out, "wb") as f:
        f.write(b"ggml" + struct.pack("i", 1))  # model type 1 = ChatGLM-6B
        f.write(struct.pack("iiiiiiiififiii", 2, Q4_0, cfg["vocab_size"], cfg["hidden_size"],
                            cfg["num_attention_heads"], cfg["num_attention_heads"], cfg["num_layers"],
                            cfg["inner_hidden_size"], cfg["layernorm_epsilon"], 0, 10000.0,
                            cfg["max_sequence_length"], cfg["eos_token_id"], cfg["pad_token_id"]))
        proto = tokenizer_model.read_bytes()
        f.write(struct.pack("i", len(proto)) + proto)
        for name, shape, kind in tensors(cfg):
            f.write(struct.pack("i", len(name)) + name.encode())
            f.write(struct.pack("i" * (len(shape) + 2), len(shape), *shape, kind))
            f.seek((f.tell() + ALIGN - 1) // ALIGN * ALIGN)
            if kind == F32:
                values = np.ones(shape, np.float32) if name.endswith("norm.weight") else np.zeros(shape, np.float32)
                f.write(values.tobytes())
                continue
            for start in range(0, shape[0], 4096):  # rows of blocks: fp16 scale, then 16 bytes of nibbles
                rows = min(4096, shape[0] - start)
                blocks = rng.integers(0, 256, size=(rows * shape[1] // BLOCK, BLOCK_BYTES), dtype=np.uint8)
                blocks[:, :2] = scale
                f.write(blocks.tobytes())


def run(main: Path, model: Path, prompt: str, new_tokens: int) -> dict:
    """chatglm.cpp's own timing of one generation: prompt ms/tokens and output ms/token."""
    proc = subprocess.run([str(main), "-m", str(model), "--mode", "generate", "-p", prompt, "-v", "--max_new_tokens",
                           str(new_tokens), "-l", "2048", "-c", "2048", "--top_k", "1"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    prompt_ms, prompt_tokens = re.search(r"prompt time: ([\d.]+) ms / (\d+) tokens", proc.stdout).groups()
    output = re.search(r"output time: ([\d.]+) ms / (\d+) tokens \(([\d.]+) ms/token\)", proc.stdout).groups()
    return {"prompt_ms": float(prompt_ms), "prompt_tokens": int(prompt_tokens), "output_tokens": int(output[1]),
            "decode_ms": float(output[2])}


OURS = """
import json, sys, time
import numpy as np
from appliance.bundle import Bundle
from appliance.engines import warm_up
from appliance.positions import layout_of
bundle = Bundle.open(sys.argv[1], full_check=False)
engine, special = bundle.engine(context=2048), bundle.tokenizer().special
ids = list(range(20100, 20100 + int(sys.argv[2]) - 2)) + [special.gmask, special.bos]
layout = layout_of(ids, special.bos, special.gmask, special.mask)
warm_up(engine, special.bos, special.gmask)
seq = engine.start()
start = time.perf_counter()
seq.prefill(np.array(ids), layout.position_ids(), layout.mask())
prompt_ms, steps = (time.perf_counter() - start) * 1000, []
for total in range(len(ids) + 1, len(ids) + 17):
    start = time.perf_counter()
    seq.step(20200, layout.step_position(total))
    steps.append((time.perf_counter() - start) * 1000)
print(json.dumps({"prompt_ms": prompt_ms, "decode_ms": float(np.median(steps[2:]))}))
"""


def run_ours(bundle: Path, tokens: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", OURS, str(bundle), str(tokens)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prompt_of(tokenizer, tokens: int) -> str:
    """Text that chatglm.cpp encodes to ``tokens`` ids (its encode appends [gMASK] and <sop>)."""
    words = ["apple", "river", "music", "green", "table", "light", "stone", "cloud"]
    text, i = "", 0
    while len(tokenizer.encode(text)) < tokens - 2:
        text += (" " if text else "") + words[i % len(words)]
        i += 1
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--main", type=Path, required=True, help="chatglm.cpp's built `main` binary")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--work", type=Path, default=Path("/tmp/streamchat-bench"))
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--ours", type=Path, help="a cpu bundle of the same shapes to alternate with")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from appliance.tokenizer import ChatGLMTokenizer
    from model_export.synthetic import FIXTURE, real_config

    cfg = real_config(args.layers)
    model = args.work / f"chatglm-cpp-q4_0-{args.layers}.bin"
    if not model.exists():
        args.work.mkdir(parents=True, exist_ok=True)
        write_ggml(cfg, FIXTURE / "ice_text.model", model)
    tokenizer = ChatGLMTokenizer(FIXTURE / "ice_text.model")
    if args.ours:
        alternate(args, model, tokenizer)
        return
    rows = []
    for tokens in args.prompts:
        result = run(args.main, model, prompt_of(tokenizer, tokens), 16)
        rows.append({"layers": args.layers, **result,
                     "prompt_tokens_per_s": result["prompt_tokens"] / result["prompt_ms"] * 1000})
        print(json.dumps(rows[-1]), flush=True)
    print("| layers | prompt tokens | prompt ms | prompt tokens/s | decode ms/token (after that prompt) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['prompt_tokens']} | {r['prompt_ms']:.0f} | {r['prompt_tokens_per_s']:.1f} | "
              f"{r['decode_ms']:.1f} |")
    (args.work / f"chatglm-cpp-{args.layers}.json").write_text(json.dumps(rows, indent=1))


def alternate(args: argparse.Namespace, model: Path, tokenizer) -> None:
    """chatglm.cpp and our engine in turns, ``--rounds`` times each, on the first ``--prompts`` length."""
    tokens = args.prompts[0]
    print("| round | runner | prompt tokens | prompt tokens/s | decode ms/token |")
    print("|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        theirs = run(args.main, model, prompt_of(tokenizer, tokens), 16)
        print(f"| {round_} | chatglm.cpp q4_0 | {theirs['prompt_tokens']} | "
              f"{theirs['prompt_tokens'] / theirs['prompt_ms'] * 1000:.1f} | {theirs['decode_ms']:.0f} |", flush=True)
        ours = run_ours(args.ours, tokens)
        print(f"| {round_} | StreamChat ({args.ours.name}) | {tokens} | {tokens / ours['prompt_ms'] * 1000:.1f} | "
              f"{ours['decode_ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
