"""Clean incremental text: deltas never show what process_response would later change."""

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.textstream import TextStream, process_response, stable_length
from tests.conftest import GOLDEN


def test_process_response_matches_thudm_rules():
    assert process_response("  你好,世界!ok, fine  ") == "你好，世界！ok, fine"
    assert process_response("a:中") == "a：中"
    assert process_response("中?") == "中？"
    assert process_response("[[训练时间]]") == "2023年"
    assert process_response("x ; y") == "x ; y"


def test_stable_length_holds_back_changeable_tails():
    assert stable_length("你好,") == 2
    assert stable_length("abc  ") == 3
    assert stable_length("ab\ufffd") == 2
    assert stable_length("训练于[[训练") == 3
    assert stable_length("x<|blan") == 1
    assert stable_length("x<b>") == 4


def _deltas(tokenizer, ids):
    stream = TextStream(tokenizer)
    out = [stream.push(i) for i in ids]
    out.append(stream.finish())
    return out


def test_all_fixture_answers_stream_cleanly(tokenizer):
    for prompt in GOLDEN["prompts"]:
        for record in prompt["greedy"].values():
            ids = [i for i in record["new_token_ids"] if i != tokenizer.special.eos]
            assert "".join(_deltas(tokenizer, ids)) == record["response"]


TEXT_PIECES = ["你", "好", "中", ",", "!", ":", ";", "?", " ", "  ", "\n", "\t", "a", "b", "[[", "训练", "时间", "]]",
               "<", "n", ">", "|", "blank_", "2", "，", "。", "Hello", "world"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TEXT_PIECES), min_size=1, max_size=30))
def test_deltas_join_to_processed_text(tokenizer, pieces):
    """For texts built from tricky pieces, tokenized and streamed id by id, every prefix shown stays shown."""
    ids = tokenizer.encode("".join(pieces))
    final = process_response(tokenizer.decode(ids))
    stream, shown = TextStream(tokenizer), ""
    for k, token in enumerate(ids):
        shown += stream.push(token)
        assert process_response(tokenizer.decode(ids[: k + 1])).startswith(shown)
        assert final.startswith(shown)
        assert "\ufffd" not in shown
    shown += stream.finish()
    assert shown == final


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=20000, max_value=21068), min_size=1, max_size=40))
def test_random_ids_stream_to_final_text(tokenizer, ids):
    assert "".join(_deltas(tokenizer, ids)) == process_response(tokenizer.decode(ids))
