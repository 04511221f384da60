import pytest

from appliance.errors import PromptError
from appliance.prompt import build_prompt, plan_prompt
from tests.conftest import GOLDEN, PROMPTS


@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=lambda p: p["name"])
def test_prompt_format_matches_chat(prompt):
    assert build_prompt(prompt["query"], [tuple(t) for t in prompt["history"]]) == prompt["prompt"]


def test_plan_keeps_everything_when_it_fits(tokenizer):
    p = PROMPTS["multi_turn"]
    plan = plan_prompt(tokenizer, p["query"], [tuple(t) for t in p["history"]], 2048, 256)
    assert plan.ids == p["prompt_input_ids"] and plan.dropped_rounds == 0 and plan.notes == []


def test_plan_drops_oldest_whole_rounds_first(tokenizer):
    p = PROMPTS["multi_turn"]
    history = [tuple(t) for t in p["history"]]
    full = len(p["prompt_input_ids"])
    plan = plan_prompt(tokenizer, p["query"], history, full + 10 - 1, 10)
    assert plan.dropped_rounds == 1
    assert plan.text == build_prompt(p["query"], history[1:])
    assert plan.text.startswith("[Round 0]\n问：What should I wear?")
    assert len(plan.ids) <= full - 1 and "oldest" in plan.notes[0]


def test_plan_keeps_the_tail_of_a_too_long_query(tokenizer):
    query = "开头的话。" + "这是一个很长的问题" * 40 + "最后一句？"
    plan = plan_prompt(tokenizer, query, [("早", "早上好")], 100, 40)
    assert len(plan.ids) <= 60
    assert query.endswith(plan.text) and plan.text.endswith("最后一句？")
    assert plan.query_chars_dropped == len(query) - len(plan.text) > 0
    assert plan.dropped_rounds == 1 and "too long" in plan.notes[0]
    assert len(tokenizer.encode_prompt(query[plan.query_chars_dropped - 1:])) > 60  # the longest tail that fits


def test_plan_refuses_empty_and_impossible(tokenizer):
    with pytest.raises(PromptError, match="empty"):
        plan_prompt(tokenizer, "  \n", [], 2048, 10)
    with pytest.raises(PromptError, match="too small"):
        plan_prompt(tokenizer, "hi", [], 10, 4)


def test_answer_room_is_at_most_half_the_budget(tokenizer):
    query = "你好" * 20  # 23 tokens with [gMASK] <sop>
    assert plan_prompt(tokenizer, query, [], 46, 5000).query_chars_dropped == 0
    assert plan_prompt(tokenizer, query, [], 44, 5000).query_chars_dropped > 0
