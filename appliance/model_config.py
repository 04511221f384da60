"""The ChatGLM-6B (v1) hyper-parameters a runtime needs, read from THUDM's config.json and validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from appliance.errors import CheckpointError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    inner_hidden_size: int
    max_sequence_length: int
    layernorm_epsilon: float
    bos_token_id: int
    eos_token_id: int
    mask_token_id: int
    gmask_token_id: int
    pad_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Each half of a head is rotated by its own position row (2D rotary)."""
        return self.head_dim // 2

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of the four linear layers of a block, as stored in the checkpoint."""
        h, f = self.hidden_size, self.inner_hidden_size
        return {"attention.query_key_value": (3 * h, h), "attention.dense": (h, h),
                "mlp.dense_h_to_4h": (f, h), "mlp.dense_4h_to_h": (h, f)}

    def param_count(self) -> int:
        per_layer = sum(o * i + o for o, i in self.linear_shapes().values()) + 4 * self.hidden_size
        return 2 * self.vocab_size * self.hidden_size + self.num_layers * per_layer + 2 * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Accept THUDM's config.json (or our own ``to_dict``); refuse other architectures by name."""
        if raw.get("model_type", "chatglm") != "chatglm":
            raise CheckpointError(f"{source}: model_type {raw.get('model_type')!r} is not ChatGLM-6B ('chatglm')")
        if "multi_query_attention" in raw or "ffn_hidden_size" in raw or "padded_vocab_size" in raw:
            raise CheckpointError(f"{source}: this is a ChatGLM2/3-6B config; StreamChat supports ChatGLM-6B (v1) only")
        if raw.get("quantization_bit", 0) not in (0, None):
            raise CheckpointError(f"{source}: a pre-quantized checkpoint (quantization_bit={raw['quantization_bit']}); "
                                  "export from the original fp16 checkpoint instead")
        if raw.get("position_encoding_2d", True) is not True:
            raise CheckpointError(f"{source}: position_encoding_2d must be true for ChatGLM-6B")
        heads = raw.get("num_heads", raw.get("num_attention_heads"))
        try:
            cfg = cls(
                vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
                num_layers=int(raw["num_layers"]), num_heads=int(heads),
                inner_hidden_size=int(raw.get("inner_hidden_size", 4 * int(raw["hidden_size"]))),
                max_sequence_length=int(raw.get("max_sequence_length", 2048)),
                layernorm_epsilon=float(raw.get("layernorm_epsilon", 1e-5)),
                bos_token_id=int(raw["bos_token_id"]), eos_token_id=int(raw["eos_token_id"]),
                mask_token_id=int(raw["mask_token_id"]), gmask_token_id=int(raw["gmask_token_id"]),
                pad_token_id=int(raw["pad_token_id"]),
            )
        except KeyError as exc:
            raise CheckpointError(f"{source}: missing key {exc.args[0]!r} (is this a ChatGLM-6B config.json?)") from exc
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: bad value ({exc})") from exc
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
            raise CheckpointError(f"{source}: hidden_size {cfg.hidden_size} does not split into {cfg.num_heads} heads "
                                  "whose size is a multiple of 4 (2D rotary)")
        return cfg
