"""Logit agreement of every quantization choice with the numpy reference, on a checkpoint (default: the golden fixture).

    python bench/quant_agreement.py [CHECKPOINT_DIR]

Prints one row per (weights, group size, lm_head precision, accuracy level): bundle-vs-reference max |dlogit|, cosine
(min/mean) and greedy agreement along the reference's greedy path (3 prompts x 9 positions).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from appliance.bundle import Bundle
from appliance.tokenizer import ChatGLMTokenizer
from model_export.checkpoint import Checkpoint
from model_export.export import ExportError, export_bundle
from model_export.reference import ReferenceEngine, ReferenceModel
from model_export.verify import VERIFY_PROMPTS, compare_engines

ROOT = Path(__file__).resolve().parent.parent
CHOICES = [("fp32", 128, "fp32", 0), ("fp16", 128, "fp16", 0)] + [
    (w, g, e, a) for w in ("int8", "int4") for g in (32, 64, 128, 256) for e in ("int8", "int4") for a in (0, 4)]


def main() -> None:
    ckpt_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "chatglm6b-tiny"
    ckpt = Checkpoint(ckpt_dir)
    tokenizer = ChatGLMTokenizer.from_dir(ckpt_dir)
    reference = ReferenceEngine(ReferenceModel.from_checkpoint(ckpt))
    print(f"checkpoint: {ckpt_dir.name} ({ckpt.config.num_layers} layers, hidden {ckpt.config.hidden_size})")
    print("| weights | group | lm_head | acc | max abs dlogit | cos min | cos mean | greedy agreement |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (weights, group, emb, acc) in enumerate(CHOICES):
            try:
                out = export_bundle(ckpt_dir, Path(tmp) / str(i), quant=weights, group_size=group, embeddings=emb,
                                    accuracy_level=acc).bundle
            except ExportError as exc:
                print(f"| {weights} | {group} | {emb} | {acc} | {exc} |", flush=True)
                continue
            m = compare_engines(Bundle.open(out, full_check=False).engine(), reference, tokenizer, VERIFY_PROMPTS, 8)
            print(f"| {weights} | {group if weights.startswith('int') else '-'} | {emb} | {acc} | {m['max_abs_diff']:.2e} "
                  f"| {m['min_cosine']:.5f} | {m['mean_cosine']:.5f} | {m['agreement']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
