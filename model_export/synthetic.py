"""Write a ChatGLM-6B-shaped checkpoint with random values, so speed is measured on real shapes without real weights.

Real widths (hidden 4096, 32 heads, inner 16384, vocab 130528), N layers, fp16 safetensors in THUDM's key layout with
``lm_head.weight`` stored beside an equal embedding (as the real checkpoint does). The tokenizer is the golden
fixture's, offset so its special pieces land on the real ids (<sop> 130004, <eop> 130005, [gMASK] 130001).

    python -m model_export.synthetic --layers 2 --out /tmp/chatglm6b-synthetic
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from appliance.model.weights import expected_shapes
from appliance.model_config import ModelConfig
from model_export.progress import Progress

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chatglm6b-tiny"
TOKENIZER_OFFSET = 130000 - 1061  # fixture's [MASK] is sentencepiece id 1061; the real [MASK] is 130000
ROWS = 4096


def real_config(layers: int) -> dict:
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "hidden_size": 4096, "inner_hidden_size": 16384,
            "num_attention_heads": 32, "num_layers": layers, "vocab_size": 130528, "max_sequence_length": 2048,
            "layernorm_epsilon": 1e-5, "position_encoding_2d": True, "bos_token_id": 130004, "eos_token_id": 130005,
            "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3 + TOKENIZER_OFFSET,
            "quantization_bit": 0, "torch_dtype": "float16", "synthetic": True}


def _filler(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> Callable[[int, int], np.ndarray]:
    """Rows [start, stop) of a tensor, drawn like the fixture's recipe (scaled normal weights, LayerNorm near 1)."""
    def rows(start: int, stop: int) -> np.ndarray:
        part = (stop - start, *shape[1:])
        if name.endswith("layernorm.weight"):
            return 1 + 0.1 * rng.standard_normal(part, dtype=np.float32)
        if name.endswith(".bias"):
            return 0.05 * rng.standard_normal(part, dtype=np.float32)
        scale = 0.5 if "word_embeddings" in name or name == "lm_head.weight" else 1 / np.sqrt(shape[-1])
        return scale * rng.standard_normal(part, dtype=np.float32)
    return rows


def write_checkpoint(out: Path, layers: int, seed: int = 0, progress: Progress | None = None,
                     widths: dict | None = None) -> Path:
    """``widths`` overrides hidden_size / inner_hidden_size / num_attention_heads (tests use small ones)."""
    progress = progress or Progress(enabled=False)
    raw_config = {**real_config(layers), **(widths or {})}
    shapes = expected_shapes(ModelConfig.from_dict(raw_config))
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = out / "model.safetensors"
    data_start = 8 + len(head)
    with path.open("wb") as fh, progress.stage("synthetic tensors", offset, "B") as advance:
        fh.write(struct.pack("<Q", len(head)) + head)
        for name, shape in shapes.items():
            if name == "lm_head.weight":  # the real checkpoint stores an equal copy of the embedding
                begin, end = header["transformer.word_embeddings.weight"]["data_offsets"]
                fh.flush()
                with path.open("rb") as src:
                    src.seek(data_start + begin)
                    for pos in range(begin, end, 1 << 26):
                        block = src.read(min(1 << 26, end - pos))
                        fh.write(block)
                        advance(len(block))
                continue
            fill = _filler(name, shape, rng)
            for start in range(0, shape[0], ROWS):
                block = fill(start, min(shape[0], start + ROWS)).astype(np.float16).tobytes()
                fh.write(block)
                advance(len(block))
    (out / "config.json").write_text(json.dumps(raw_config, indent=1))
    (out / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": TOKENIZER_OFFSET,
                                                           "tokenizer_class": "ChatGLMTokenizer"}))
    shutil.copyfile(FIXTURE / "ice_text.model", out / "ice_text.model")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_export.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, required=True, help="number of transformer blocks (the real model has 28)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_checkpoint(args.out, args.layers, args.seed, Progress())
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"synthetic ChatGLM-6B checkpoint ({args.layers} layers, {size / 1e9:.2f} GB): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
