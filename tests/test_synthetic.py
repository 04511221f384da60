"""Synthetic ChatGLM-6B-layout checkpoints: real vocabulary and special ids, exportable and runnable."""

from appliance.bundle import Bundle
from appliance.generation import GenerationConfig, StreamGenerator
from model_export.checkpoint import Checkpoint
from model_export.export import export_bundle
from model_export.synthetic import write_checkpoint


def test_synthetic_checkpoint_exports_and_decodes(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    ckpt_dir = write_checkpoint(tmp_path / "ckpt", layers=1,
                                widths={"hidden_size": 64, "inner_hidden_size": 256, "num_attention_heads": 4})
    ckpt = Checkpoint(ckpt_dir)
    assert ckpt.config.vocab_size == 130528 and ckpt.config.bos_token_id == 130004
    assert set(ckpt.refs) >= {"lm_head.weight", "transformer.word_embeddings.weight"}
    assert ckpt.refs["lm_head.weight"] != ckpt.refs["transformer.word_embeddings.weight"] and ckpt.lm_head_is_tied()
    bundle = Bundle.open(export_bundle(ckpt_dir, tmp_path / "bundle", quant="int4").bundle)
    assert bundle.manifest["quant"]["lm_head_shared_with_embedding"] is True
    tokenizer = bundle.tokenizer()
    assert tokenizer.special.bos == 130004 and tokenizer.special.eos == 130005
    result = StreamGenerator(bundle.engine(), tokenizer).run(tokenizer.encode_prompt("你好"),
                                                              GenerationConfig(greedy=True, max_new_tokens=6))
    assert len(result.token_ids) >= 1 and all(0 <= t < 130528 for t in result.token_ids)
