"""Train StreamChat's built-in demo model: a tiny ChatGLM-6B-architecture model that answers questions about StreamChat.

    pip install torch==2.13.0 protobuf      # dev-only; the app never imports torch
    python -m model_export.demo.train [--out appliance/demo/checkpoint] [--epochs N] [--hidden H] [--layers L]

Deterministic (fixed seeds, single-threaded sentencepiece, deterministic torch kernels); about 30 minutes (one thread).
It writes THUDM's layout (config.json, tokenizer_config.json, ice_text.model, model.safetensors with a tied lm_head)
and then runs the written checkpoint through the numpy reference. The model trained is ``appliance.model.definition``
on torch tensors (``TorchOps``), the same definition every backend of the appliance runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from torch import nn

from appliance.generation import GenerationConfig, StreamGenerator
from appliance.model.definition import MASK_FILL, attention_scales, forward, rotary_half_table
from appliance.model.weights import EMBEDDING, LM_HEAD, expected_shapes
from appliance.model_config import ModelConfig
from appliance.positions import PromptLayout, layout_of
from appliance.prompt import build_prompt
from appliance.tokenizer import MAX_BLANK, SPECIAL_PIECES, ChatGLMTokenizer
from model_export.demo.corpus import first_phrasings, read_corpus
from model_export.reference import ReferenceEngine, ReferenceModel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEFAULT_OUT = ROOT / "appliance" / "demo" / "checkpoint"
SIZES = {"hidden_size": 192, "num_layers": 3, "num_attention_heads": 4, "inner_hidden_size": 768,
         "max_sequence_length": 512}
EPOCHS, BATCH, LR, WEIGHT_DECAY = 20, 16, 3e-3, 0.0
# sentencepiece's vocabulary: room for every character of the text (byte fallback covers the others) and its pieces
VOCAB = 2000
NOISE = 0.05  # share of question tokens replaced by random pieces while training: no single word decides an answer


def train_tokenizer(corpus: list[dict], out: Path) -> Path:
    """A unigram sentencepiece model with ChatGLM-6B's piece layout: <unk> <s> </s> <pad> <n> <|tab|> <|blank_2..80|>,
    learned pieces (with byte fallback), then the eight GLM control pieces last."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    lines = []
    for ex in corpus:
        lines += [ChatGLMTokenizer.preprocess(build_prompt(ex["query"], [tuple(t) for t in ex["history"]])),
                  ChatGLMTokenizer.preprocess(ex["answer"])]
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text("\n".join(lines), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=f"{tmp}/sp", model_type="unigram", vocab_size=VOCAB, hard_vocab_limit=False,
            character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, seed_sentencepiece_size=100000,
            user_defined_symbols=["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)],
            minloglevel=2)
        proto = model_pb2.ModelProto()
        proto.ParseFromString(Path(f"{tmp}/sp.model").read_bytes())
    for piece in SPECIAL_PIECES:
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, 0.0, model_pb2.ModelProto.SentencePiece.CONTROL
    path = out / "ice_text.model"
    path.write_bytes(proto.SerializeToString())
    return path


class TorchOps:
    """The definition's operations on torch tensors (autograd flows through them), over ``model``'s parameters, for
    ids [b, L] at ``positions`` [b, 2, L] under ``mask`` [b, 1, L, L] (True = masked); logits at every position."""

    def __init__(self, model: TinyChatGLM, positions: torch.Tensor, mask: torch.Tensor) -> None:
        self.config, self.model, self.positions, self.mask = model.cfg, model, positions, mask

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.model.weight(EMBEDDING))

    def rotary_half(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.positions[:, row]
        return self.model.cos[index][:, :, None], self.model.sin[index][:, :, None]

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.model.weight(name + ".weight"), self.model.weight(name + ".bias"))

    def layer_norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.model.weight(name + ".weight"), self.model.weight(name + ".bias")
        return nn.functional.layer_norm(x, weight.shape, weight, bias, self.config.layernorm_epsilon)

    def split_heads(self, x: torch.Tensor, parts: int) -> list[torch.Tensor]:
        cfg = self.config
        return self.split(x.view(*x.shape[:-1], cfg.num_heads, parts * cfg.head_dim), parts)

    @staticmethod
    def split(x: torch.Tensor, parts: int) -> list[torch.Tensor]:
        return list(x.chunk(parts, dim=-1))

    @staticmethod
    def concat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, dim=-1)

    @staticmethod
    def add(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
        return a + b

    @staticmethod
    def mul(a: torch.Tensor, b: torch.Tensor | float | np.ndarray) -> torch.Tensor:
        return a * (torch.from_numpy(b) if isinstance(b, np.ndarray) else b)

    tanh = staticmethod(torch.tanh)

    @staticmethod
    def gelu(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")  # torch's own tanh GELU, the definition's formula

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """THUDM's arithmetic, as the numpy reference does it: q divided and the scores rescaled by
        ``attention_scales``, masked scores MASK_FILL."""
        b, length, _, head_dim = q.shape
        divisor, coeff = attention_scales(layer, head_dim)
        scores = (q.transpose(1, 2) / float(divisor)) @ k.permute(0, 2, 3, 1)
        probs = (scores.masked_fill(self.mask, MASK_FILL) * float(coeff)).softmax(-1)
        return (probs @ v.transpose(1, 2)).transpose(1, 2).reshape(b, length, self.config.hidden_size)

    @staticmethod
    def output_rows(x: torch.Tensor) -> torch.Tensor:
        return x

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.model.weight(EMBEDDING).T  # tied


class TinyChatGLM(nn.Module):
    """``appliance.model.definition`` on torch parameters named as THUDM's checkpoint (the head tied to the
    embedding, as the demo is saved): initialised for training, or loaded from ``tensors`` (name -> array)."""

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = [name for name in expected_shapes(cfg) if name != LM_HEAD]
        self.params = nn.ParameterDict({_key(name): nn.Parameter(
            torch.from_numpy(np.asarray(tensors[name], dtype=np.float32)) if tensors is not None else
            _initial(name, expected_shapes(cfg)[name])) for name in self.names})
        cos, sin = rotary_half_table(np.arange(cfg.max_sequence_length + 1), cfg.rotary_dim)
        self.register_buffer("cos", torch.from_numpy(cos), persistent=False)
        self.register_buffer("sin", torch.from_numpy(sin), persistent=False)

    def weight(self, name: str) -> nn.Parameter:
        return self.params[_key(name)]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [b, L, vocab] of ids [b, L] at positions pos [b, 2, L] under mask [b, 1, L, L] (True = masked)."""
        return forward(TorchOps(self, pos, mask), ids)

    def state_dict_thudm(self) -> dict[str, np.ndarray]:
        """THUDM's key names (lm_head tied, so only the embedding is stored, as save_pretrained does)."""
        return {name: self.weight(name).detach().numpy().astype(np.float16) for name in self.names}


def _key(name: str) -> str:
    """A parameter key for a THUDM name (torch refuses dots in parameter names)."""
    return name.replace(".", "/")


def _initial(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Biases 0, LayerNorm gains 1, matrices N(0, 0.02)."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape) * 0.02


def train_step(model: TinyChatGLM, opt: torch.optim.Optimizer, batch: list[torch.Tensor]) -> torch.Tensor:
    """One optimiser step on the answer tokens of ``batch`` (ids, positions, masks, targets); returns the loss."""
    ids, pos, mask, targets = batch
    logits = model(ids, pos, mask)
    loss = nn.functional.cross_entropy(logits.reshape(-1, model.cfg.vocab_size), targets.reshape(-1), ignore_index=-100)
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def tokenize_examples(corpus: list[dict], tok: ChatGLMTokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + eos) per example, in ChatGLM-6B's chat format."""
    return [(tok.encode_prompt(build_prompt(ex["query"], [tuple(t) for t in ex["history"]])),
             tok.encode(ex["answer"]) + [tok.special.eos]) for ex in corpus]


def pad_batch(rows: list[tuple[list[int], list[int]]], tok: ChatGLMTokenizer) -> list[torch.Tensor]:
    """Padded ids, positions, masks and answer-only targets for ``rows`` (one batch)."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = np.full((len(rows), width), tok.special.pad, dtype=np.int64)
    pos = np.zeros((len(rows), 2, width), dtype=np.int64)
    mask = np.ones((len(rows), 1, width, width), dtype=bool)
    targets = np.full((len(rows), width), -100, dtype=np.int64)
    for i, (prompt, answer) in enumerate(rows):
        seq = prompt + answer
        base = layout_of(prompt, tok.special.bos, tok.special.gmask, tok.special.mask)
        layout = PromptLayout(len(seq), base.context_length, base.mask_position)
        ids[i, : len(seq)] = seq
        pos[i, :, : len(seq)] = layout.position_ids()
        mask[i, 0, : len(seq), : len(seq)] = layout.mask()
        mask[i, 0, len(seq):, :] = False  # padding rows: anything finite; their loss is ignored
        targets[i, len(prompt) - 1: len(seq) - 1] = answer
    return [torch.from_numpy(a) for a in (ids, pos, mask, targets)]


def encode_examples(corpus: list[dict], tok: ChatGLMTokenizer, cfg: ModelConfig) -> list[torch.Tensor]:
    """``corpus`` as one padded batch."""
    return pad_batch(tokenize_examples(corpus, tok), tok)


def add_noise(rows: list[tuple[list[int], list[int]]], share: float, vocab: range,
              generator: torch.Generator) -> list[tuple[list[int], list[int]]]:
    """``rows`` with about ``share`` of each prompt's tokens (all but its closing [gMASK] <sop>) replaced by random
    ids from ``vocab``; the answers stay. The model learns to answer from all of a question, not from one piece."""
    noisy = []
    for prompt, answer in rows:
        body = torch.tensor(prompt[:-2])
        hit = torch.rand(len(body), generator=generator) < share
        body[hit] = torch.randint(vocab.start, vocab.stop, (int(hit.sum()),), generator=generator)
        noisy.append((body.tolist() + prompt[-2:], answer))
    return noisy


def epoch_batches(rows: list, size: int, generator: torch.Generator) -> list[list]:
    """``rows`` in a fresh seeded order, cut into batches of ``size``; rows of similar length share a batch (sorted
    within windows of 8 batches), so little of each batch is padding."""
    order = torch.randperm(len(rows), generator=generator).tolist()
    window = 8 * size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        batches += [[rows[i] for i in chunk[j:j + size]] for j in range(0, len(chunk), size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def write_checkpoint(model: TinyChatGLM, cfg: ModelConfig, out: Path) -> None:
    from safetensors.numpy import save_file

    raw = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "_name_or_path": "streamchat-demo",
           "hidden_size": cfg.hidden_size, "inner_hidden_size": cfg.inner_hidden_size,
           "num_attention_heads": cfg.num_heads, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
           "max_sequence_length": cfg.max_sequence_length, "layernorm_epsilon": cfg.layernorm_epsilon,
           "position_encoding_2d": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
           "mask_token_id": cfg.mask_token_id, "gmask_token_id": cfg.gmask_token_id,
           "pad_token_id": cfg.pad_token_id, "quantization_bit": 0, "torch_dtype": "float16",
           "streamchat_demo": True}
    (out / "config.json").write_text(json.dumps(raw, indent=1) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"name_or_path": "streamchat-demo", "bos_token": "<sop>", "eos_token": "<eop>", "gmask_token": "[gMASK]",
         "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>", "num_image_tokens": 0,
         "tokenizer_class": "ChatGLMTokenizer"}, indent=1) + "\n")
    save_file(model.state_dict_thudm(), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file creates it owner-only; the installers ship it to every user


def check_answers(out: Path, corpus: list[dict]) -> float:
    """Greedy answers of the written (fp16) checkpoint through the numpy reference to ``corpus``'s questions: the
    share that reproduces the trained answer exactly."""
    from appliance.textstream import process_response
    from model_export.checkpoint import Checkpoint

    tok = ChatGLMTokenizer.from_dir(out)
    gen = StreamGenerator(ReferenceEngine(ReferenceModel.from_checkpoint(Checkpoint(out))), tok)
    exact = 0
    for ex in corpus:
        ids = tok.encode_prompt(build_prompt(ex["query"], [tuple(t) for t in ex["history"]]))
        answer = gen.run(ids, GenerationConfig(greedy=True, max_new_tokens=128, repetition_penalty=1.0)).response
        exact += answer == process_response(tok.decode(tok.encode(ex["answer"])))
    return exact / len(corpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--hidden", type=int, default=SIZES["hidden_size"], help="hidden size (inner: 4 times)")
    parser.add_argument("--layers", type=int, default=SIZES["num_layers"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every machine, and no spinning on a busy one
    corpus = read_corpus()
    args.out.mkdir(parents=True, exist_ok=True)
    tok = ChatGLMTokenizer(train_tokenizer(corpus, args.out), num_image_tokens=0)
    sizes = {**SIZES, "hidden_size": args.hidden, "inner_hidden_size": 4 * args.hidden, "num_layers": args.layers}
    cfg = ModelConfig.from_dict({**sizes, "vocab_size": tok.vocab_size, "bos_token_id": tok.special.bos,
                                 "eos_token_id": tok.special.eos, "mask_token_id": tok.special.mask,
                                 "gmask_token_id": tok.special.gmask, "pad_token_id": tok.special.pad})
    rows = tokenize_examples(corpus, tok)
    pieces = range(tok.special.pad + 1, tok.vocab_size - len(SPECIAL_PIECES))  # learned pieces, no control ones
    model = TinyChatGLM(cfg)
    order = torch.Generator().manual_seed(0)
    steps = args.epochs * len(epoch_batches(rows, BATCH, torch.Generator()))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.1)
    start = time.time()
    for epoch in range(args.epochs):
        losses = []
        for batch in epoch_batches(rows, BATCH, order):
            losses.append(train_step(model, opt, pad_batch(add_noise(batch, NOISE, pieces, order), tok)).item())
            sched.step()
        print(f"epoch {epoch:3d}  loss {np.mean(losses):.4f}  {time.time() - start:.0f}s", flush=True)
    write_checkpoint(model, cfg, args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({params / 1e6:.2f} M parameters, vocab {cfg.vocab_size})")
    checked = first_phrasings()
    print(f"greedy answers to the first phrasing of each of the {len(checked)} groups reproduced exactly (numpy "
          f"reference, fp16 weights): {check_answers(args.out, checked):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
