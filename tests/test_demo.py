"""The built-in demo model: trained answers survive the normal export to an INT8 bundle and the normal CLI."""

import json
import os
import subprocess
import sys

import pytest

from appliance.bundle import Bundle
from appliance.loading import DEMO_CHECKPOINT, demo_bundle
from appliance.prompt import build_prompt
from appliance.textstream import process_response
from appliance.tokenizer import ChatGLMTokenizer
from model_export.demo.corpus import first_phrasings, read_corpus
from model_export.export import export_bundle
from streamchat.cli import main

CORPUS = read_corpus()
CHECKED = first_phrasings()  # one phrasing of each question the corpus teaches


@pytest.fixture(scope="module")
def demo_int8(tmp_path_factory):
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return export_bundle(DEMO_CHECKPOINT, tmp_path_factory.mktemp("demo") / "int8", quant="int8").bundle


def test_checkpoint_is_thudm_layout_with_demo_tokenizer():
    names = {p.name for p in DEMO_CHECKPOINT.iterdir()}
    assert {"config.json", "tokenizer_config.json", "ice_text.model", "model.safetensors"} <= names
    tok = ChatGLMTokenizer.from_dir(DEMO_CHECKPOINT)
    assert tok.num_image_tokens == 0
    assert [tok.id_to_piece(i) for i in range(6)] == ["<unk>", "<s>", "</s>", "<pad>", "<n>", "<|tab|>"]
    assert [tok.id_to_piece(i) for i in range(tok.vocab_size - 8, tok.vocab_size)] == [
        "[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
    assert sum(p.stat().st_size for p in DEMO_CHECKPOINT.iterdir()) < 5_000_000


def test_int8_bundle_reproduces_the_trained_answers(demo_int8, capsys, tmp_path):
    tok = Bundle.open(demo_int8).tokenizer()
    exact, starts = 0, 0
    for ex in CHECKED:
        argv = ["generate", "--bundle", str(demo_int8), "--prompt", ex["query"], "--greedy", "--json",
                "--repetition-penalty", "1.0", "--max-new-tokens", "128"]
        if ex["history"]:
            (tmp_path / "h.json").write_text(json.dumps(ex["history"], ensure_ascii=False), encoding="utf-8")
            argv += ["--history", str(tmp_path / "h.json")]
        assert main(argv) == 0
        response = json.loads(capsys.readouterr().out)["response"]
        expected = process_response(tok.decode(tok.encode(ex["answer"])))
        exact += response == expected
        starts += response[:6] == expected[:6]
    assert exact / len(CHECKED) >= 0.9
    # INT8 rounding may tip a question between two close topics ("How do I export a real model?" gets the answer
    # to "How do I use a real model?" from the INT8 bundle, the trained one from the fp16 checkpoint)
    assert starts / len(CHECKED) >= 0.98


def test_prompts_use_the_chat_format():
    multi = [ex for ex in CORPUS if ex["history"]]
    assert len(multi) >= 4
    assert build_prompt(multi[0]["query"], [tuple(t) for t in multi[0]["history"]]).startswith("[Round 0]\n问：")


def test_generate_demo_on_a_fresh_install(tmp_path):
    env = {**os.environ, "STREAMCHAT_CONFIG_DIR": str(tmp_path / "config"), "STREAMCHAT_DATA_DIR": str(tmp_path / "data"),
           "STREAMCHAT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONIOENCODING": "utf-8"}
    run = [sys.executable, "-m", "streamchat", "generate", "--demo", "--prompt", "StreamChat 是什么？", "--seed", "0"]
    first = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "StreamChat" in first.stdout and "离线" in first.stdout
    assert "first run" in first.stderr
    second = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert second.stdout == first.stdout and "first run" not in second.stderr  # exported once, same seed, same answer


def test_demo_is_labelled(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    bundle = Bundle.open(demo_bundle(tmp_path, export_bundle))
    assert bundle.is_demo and bundle.label.startswith("DEMO")
