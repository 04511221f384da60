import pytest

from appliance.errors import TokenizerError
from appliance.tokenizer import ChatGLMTokenizer
from tests.conftest import GOLDEN, TINY


@pytest.mark.parametrize("case", GOLDEN["tokenizer_cases"], ids=lambda c: repr(c["text"])[:24])
def test_tokenizer_case(tokenizer, case):
    assert tokenizer.preprocess(case["text"]) == case["preprocessed_for_sp"]
    assert tokenizer.encode(case["text"]) == case["ids_no_special"]
    assert tokenizer.pieces(case["text"]) == case["pieces"]
    assert tokenizer.encode_prompt(case["text"]) == case["ids_with_special"]
    assert tokenizer.decode(case["ids_no_special"]) == case["decode"]


@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=lambda p: p["name"])
def test_prompt_ids(tokenizer, prompt):
    assert tokenizer.encode_prompt(prompt["query"]) == prompt["query_input_ids"]
    assert tokenizer.encode_prompt(prompt["prompt"]) == prompt["prompt_input_ids"]
    assert [tokenizer.id_to_piece(i) for i in prompt["prompt_input_ids"]] == prompt["prompt_tokens"]


def test_special_ids_and_control_pieces_decode_to_nothing(tokenizer):
    special = GOLDEN["meta"]["special_token_ids"]
    assert tokenizer.special.gmask == special["[gMASK]"] and tokenizer.special.bos == special["<sop>"]
    assert tokenizer.special.eos == special["<eop>"] and tokenizer.special.pad == special["<pad>"]
    assert tokenizer.vocab_size == GOLDEN["meta"]["vocab_size"]
    assert tokenizer.decode(GOLDEN["decode_special_ids"]["ids"]) == GOLDEN["decode_special_ids"]["decode"] == ""


def test_blank_runs_longest_first(tokenizer):
    assert tokenizer.preprocess(" " * 81 + "x") == "<|blank_80|> x"
    assert tokenizer.preprocess("a" + " " * 3 + "b\tc\n") == "a<|blank_3|>b<|tab|>c<n>"


def test_offset_zero_gives_raw_sentencepiece_ids():
    tok = ChatGLMTokenizer(TINY / "ice_text.model", num_image_tokens=0)
    assert tok.encode("你好") == [i - 20000 for i in GOLDEN["tokenizer_cases"][0]["ids_no_special"]]
    assert tok.special.bos == GOLDEN["meta"]["special_token_ids"]["<sop>"] - 20000


def test_missing_or_foreign_model_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        ChatGLMTokenizer(tmp_path / "ice_text.model")
    (tmp_path / "ice_text.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="cannot load"):
        ChatGLMTokenizer(tmp_path / "ice_text.model")
