"""The streaming generator on the reference engine against THUDM's greedy and stream_chat records."""

import threading

import numpy as np
import pytest

from appliance.errors import PromptError
from appliance.generation import (
    GenerationConfig,
    GenerationResult,
    InvalidScoreGuard,
    RepetitionPenalty,
    StreamGenerator,
    Temperature,
    TopK,
    TopP,
)
from appliance.settings import SettingsError
from appliance.textstream import TextStream, process_response
from tests.conftest import GOLDEN


@pytest.mark.parametrize("rp", ["1.0", "1.2"])
@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=lambda p: p["name"])
def test_greedy_matches_chat(reference_engine, tokenizer, prompt, rp):
    expected = prompt["greedy"][f"rp{rp}"]
    gen = StreamGenerator(reference_engine, tokenizer)
    result = gen.run(prompt["prompt_input_ids"], GenerationConfig(greedy=True, max_new_tokens=24,
                                                                    repetition_penalty=float(rp)))
    assert result.token_ids == expected["new_token_ids"]
    assert result.response == expected["response"]
    assert "".join(result.deltas) == result.response
    assert result.stopped == ("eos" if expected["stopped_on_eos"] else "max_new_tokens")


@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=lambda p: p["name"])
def test_stream_is_consistent_with_stream_chat_yields(reference_engine, tokenizer, prompt):
    """After k tokens, the text shown so far is a prefix of THUDM's k-th yield (which may still change)."""
    for key, record in prompt["stream_chat"].items():
        rp = float(key[2:])
        result_ids = prompt["greedy"][key]["new_token_ids"]
        shown, per_token = "", []
        stream = TextStream(tokenizer)
        for token in result_ids:
            if token == tokenizer.special.eos:
                break
            shown += stream.push(token)
            per_token.append(shown)
        assert len(record["yields"]) == record["num_yields"]
        for k, yielded in enumerate(record["yields"]):
            assert yielded.startswith(per_token[k]), (k, yielded, per_token[k])
            assert "\ufffd" not in per_token[k]
        config = GenerationConfig(greedy=True, max_new_tokens=24, repetition_penalty=rp)
        full = StreamGenerator(reference_engine, tokenizer).run(prompt["prompt_input_ids"], config)
        assert full.response == process_response(tokenizer.decode(result_ids))


def test_cancel_stops_within_one_token(reference_engine, tokenizer):
    prompt = GOLDEN["prompts"][0]["prompt_input_ids"]
    cancel = threading.Event()
    gen = StreamGenerator(reference_engine, tokenizer)
    result = GenerationResult(prompt_ids=prompt)
    stream = gen.stream(prompt, GenerationConfig(greedy=True, max_new_tokens=24), cancel, result)
    next(stream)
    cancel.set()
    rest = list(stream)
    assert result.stopped == "cancelled"
    assert len(result.token_ids) <= 2
    assert len(rest) <= 2


def test_context_full_stops(reference_engine, tokenizer):
    prompt = GOLDEN["prompts"][0]["prompt_input_ids"]
    engine = type("Small", (), {"max_context": len(prompt) + 3, "start": reference_engine.start, "name": "small"})()
    result = StreamGenerator(engine, tokenizer).run(prompt, GenerationConfig(greedy=True, max_new_tokens=24))
    assert result.stopped == "context"
    assert len(result.token_ids) == 3
    with pytest.raises(PromptError, match="context"):
        StreamGenerator(engine, tokenizer).run(prompt + prompt, GenerationConfig(greedy=True))


def test_seeded_sampling_is_reproducible_and_varies(reference_engine, tokenizer):
    prompt = GOLDEN["prompts"][1]["prompt_input_ids"]
    gen = StreamGenerator(reference_engine, tokenizer)
    runs = [gen.run(prompt, GenerationConfig(max_new_tokens=12, seed=s, temperature=1.5, top_p=1.0)).token_ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_repetition_penalty_follows_hf():
    logits = np.array([2.0, -2.0, 1.0, -1.0], dtype=np.float32)
    out = RepetitionPenalty(2.0)(logits.copy(), np.array([True, True, False, False]))
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, -1.0])


def test_invalid_scores_guard():
    out = InvalidScoreGuard()(np.array([np.nan, 1, 2, 3, 4, 5, 6], dtype=np.float32), np.zeros(7, dtype=bool))
    assert out[5] == 5e4 and out.sum() == 5e4


def test_warpers_keep_the_right_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    seen = np.zeros(4, dtype=bool)
    kept = np.isfinite(TopP(0.7)(logits.copy(), seen))
    assert kept.tolist() == [True, True, False, False]  # 0.5 alone is not > 0.7 of the mass
    kept = np.isfinite(TopK(3)(logits.copy(), seen))
    assert kept.tolist() == [True, True, True, False]
    np.testing.assert_allclose(Temperature(0.5)(logits.copy(), seen), logits / 0.5)


def test_bad_settings_are_refused():
    with pytest.raises(SettingsError, match="temperature"):
        GenerationConfig(temperature=0)
    with pytest.raises(SettingsError, match="top_p"):
        GenerationConfig(top_p=1.5)


def test_padded_model_vocabulary_beyond_the_tokenizer(tokenizer):
    """Real ChatGLM-6B has more embedding rows than tokenizer pieces; a sampled padding id must not crash."""
    vocab = tokenizer.vocab_size + 100

    class Sequence:
        def prefill(self, ids, positions, mask):
            return self.logits()

        def step(self, token, positions):
            return self.logits()

        @staticmethod
        def logits():
            out = np.zeros(vocab, dtype=np.float32)
            out[-1] = 50.0  # a padding row wins
            return out

    engine = type("Padded", (), {"name": "padded", "max_context": 64, "start": lambda self: Sequence()})()
    result = StreamGenerator(engine, tokenizer).run(tokenizer.encode_prompt("你好"),
                                                     GenerationConfig(greedy=True, max_new_tokens=3))
    assert result.token_ids == [vocab - 1] * 3 and result.response == ""
