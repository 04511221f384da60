"""ChatGLM-6B tokenizer semantics on plain sentencepiece (no transformers, no remote code).

Newlines, tabs and runs of 2..80 spaces are replaced by user-defined pieces before sentencepiece sees the text
(longest runs first), token id = sentencepiece id + ``num_image_tokens``, and a prompt ends with ``[gMASK] <sop>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from appliance.errors import TokenizerError

MAX_BLANK = 80
SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the pieces the model and generator need by name."""

    mask: int
    gmask: int
    bos: int
    eos: int
    pad: int

    def as_dict(self) -> dict[str, int]:
        return {"[MASK]": self.mask, "[gMASK]": self.gmask, "<sop>": self.bos, "<eop>": self.eos, "<pad>": self.pad}


def replace_lone_surrogates(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, so sentencepiece (which needs valid UTF-8) accepts it.

    Python hands over undecodable bytes (in argv, or from a stream decoded with ``surrogateescape``) as lone surrogates
    U+DC80..U+DCFF; a JSON ``\\ud800`` escape gives one as well. A high and low surrogate that follow each other are
    joined into the character they encode.
    """
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _blank(n: int) -> str:
    return f"<|blank_{n}|>"


class ChatGLMTokenizer:
    """Encode/decode exactly as THUDM's ``ChatGLMTokenizer`` (v1) does."""

    def __init__(self, model_file: str | Path, num_image_tokens: int = 0) -> None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise TokenizerError(f"tokenizer model not found: {model_file}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot load tokenizer model {model_file}: {exc}") from exc
        self.model_file = model_file
        self.num_image_tokens = num_image_tokens
        missing = [p for p in (*SPECIAL_PIECES, "<n>", "<|tab|>", _blank(2), _blank(MAX_BLANK))
                   if self.sp.PieceToId(p) == self.sp.unk_id()]
        if missing:
            raise TokenizerError(f"{model_file} is not a ChatGLM-6B tokenizer: missing pieces {missing}")
        self.special = SpecialIds(
            mask=self.piece_id("[MASK]"), gmask=self.piece_id("[gMASK]"), bos=self.piece_id("<sop>"),
            eos=self.piece_id("<eop>"), pad=self.piece_id("<pad>"),
        )

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatGLMTokenizer:
        """Load ``ice_text.model`` with the offset from ``tokenizer_config.json`` (0 when the file is absent)."""
        directory = Path(directory)
        offset = 0
        cfg = directory / "tokenizer_config.json"
        if cfg.is_file():
            try:
                offset = int(json.loads(cfg.read_text(encoding="utf-8")).get("num_image_tokens", 0))
            except (ValueError, TypeError) as exc:
                raise TokenizerError(f"{cfg} is not valid JSON with an integer num_image_tokens: {exc}") from exc
        return cls(directory / "ice_text.model", num_image_tokens=offset)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize() + self.num_image_tokens

    def piece_id(self, piece: str) -> int:
        return self.sp.PieceToId(piece) + self.num_image_tokens

    def id_to_piece(self, token_id: int) -> str:
        sp_id = token_id - self.num_image_tokens
        if 0 <= sp_id < self.sp.GetPieceSize():
            return self.sp.IdToPiece(sp_id)
        return f"<image_{token_id}>"

    @staticmethod
    def preprocess(text: str) -> str:
        """The substitutions THUDM applies before sentencepiece (longest blank runs first)."""
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(MAX_BLANK, 1, -1):
            text = text.replace(" " * n, _blank(n))
        return text

    @staticmethod
    def postprocess(text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for n in range(2, MAX_BLANK + 1):
            text = text.replace(_blank(n), " " * n)
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids without the ``[gMASK] <sop>`` suffix."""
        return [i + self.num_image_tokens for i in self.sp.EncodeAsIds(self.preprocess(replace_lone_surrogates(text)))]

    def pieces(self, text: str) -> list[str]:
        """Piece names as THUDM's tokenizer reports them (unknown characters as ``<unk>``)."""
        return [self.id_to_piece(i) for i in self.encode(text)]

    def encode_prompt(self, text: str) -> list[int]:
        """What ``tok(text)["input_ids"]`` gives: ids followed by ``[gMASK] <sop>``."""
        return [*self.encode(text), self.special.gmask, self.special.bos]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; image tokens, ``<pad>`` and control pieces give nothing."""
        sp_ids = [i - self.num_image_tokens for i in ids if i != self.special.pad]
        return self.postprocess(self.sp.DecodeIds([i for i in sp_ids if 0 <= i < self.sp.GetPieceSize()]))
