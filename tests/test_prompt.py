import pytest

from appliance.errors import PromptError
from appliance.prompt import build_prompt, plan_prompt, system_turn
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


SYSTEM = "你是一个简洁的助手，用一句话回答。"


def test_a_system_prompt_is_round_0_with_an_acknowledgement_in_its_script():
    assert build_prompt("今天呢？", [], SYSTEM) == f"[Round 0]\n问：{SYSTEM}\n答：好的。\n[Round 1]\n问：今天呢？\n答："
    assert build_prompt("Hi", [("a", "b")], "  Answer in English.\n") == (
        "[Round 0]\n问：Answer in English.\n答：OK.\n[Round 1]\n问：a\n答：b\n[Round 2]\n问：Hi\n答：")
    assert system_turn(SYSTEM) == (SYSTEM, "好的。") and system_turn("Be brief.") == ("Be brief.", "OK.")
    assert build_prompt("Hi", [], "   ") == "Hi"  # blank: no system round


def test_the_system_prompt_counts_against_the_budget_and_is_kept_when_rounds_are_dropped(tokenizer):
    p = PROMPTS["multi_turn"]
    history = [tuple(t) for t in p["history"]]
    full = tokenizer.encode_prompt(build_prompt(p["query"], history, SYSTEM))
    fits = plan_prompt(tokenizer, p["query"], history, len(full) + 10, 10, system=SYSTEM)
    assert fits.ids == full and fits.dropped_rounds == 0 and fits.text.startswith(f"[Round 0]\n问：{SYSTEM}\n答：好的。\n")
    # the same budget that holds the whole conversation without a system prompt drops a round with it
    without = len(tokenizer.encode_prompt(build_prompt(p["query"], history)))
    assert without < len(full)
    one_short = plan_prompt(tokenizer, p["query"], history, len(full) + 10 - 1, 10, system=SYSTEM)
    assert one_short.dropped_rounds == 1 and "oldest" in one_short.notes[0]
    assert one_short.text == build_prompt(p["query"], history[1:], SYSTEM)  # the oldest round left out, the system kept
    assert one_short.text.startswith(f"[Round 0]\n问：{SYSTEM}\n答：好的。\n[Round 1]\n问：What should I wear?")
    assert len(one_short.ids) <= len(full) - 1


def test_a_too_long_query_keeps_the_system_prompt_and_the_querys_tail(tokenizer):
    query = "开头的话。" + "这是一个很长的问题" * 40 + "最后一句？"
    plan = plan_prompt(tokenizer, query, [("早", "早上好")], 120, 40, system=SYSTEM)
    assert len(plan.ids) <= 80 and plan.dropped_rounds == 1 and "too long" in plan.notes[0]
    tail = query[plan.query_chars_dropped:]
    assert plan.text == build_prompt(tail, [], SYSTEM) and tail.endswith("最后一句？")
    assert len(tokenizer.encode_prompt(build_prompt(query[plan.query_chars_dropped - 1:], [], SYSTEM))) > 80


def test_a_system_prompt_that_leaves_no_room_is_one_clear_error(tokenizer):
    with pytest.raises(PromptError, match="system prompt leaves no room .* shorten it in Settings or raise the budget"):
        plan_prompt(tokenizer, "hi", [], 64, 10, system="请记住这条很长的规则。" * 20)


def test_the_session_sends_the_settings_system_prompt(tokenizer, reference_engine):
    from appliance.session import ChatSession
    from appliance.settings import Settings

    settings = Settings()
    settings.system_prompt, settings.generation.max_new_tokens = SYSTEM, 2
    session = ChatSession(reference_engine, tokenizer, settings)
    list(session.send("你好"))
    assert session.last.generation.prompt_ids == tokenizer.encode_prompt(build_prompt("你好", [], SYSTEM))
    first = session.last.response
    list(session.send("再见"))  # the stored turns follow the system round; the system prompt is not stored as a turn
    assert session.turns()[0] == ("你好", first)
    assert session.last.generation.prompt_ids == tokenizer.encode_prompt(build_prompt("再见", [("你好", first)], SYSTEM))


def test_the_openai_route_takes_system_messages_as_the_system_prompt():
    from appliance.service.openai_format import parse_request

    asked = parse_request({"messages": [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "a"},
                                        {"role": "assistant", "content": "b"}, {"role": "developer", "content": "No lists."},
                                        {"role": "user", "content": "c"}]}, 1000)
    assert (asked.query, asked.turns, asked.system) == ("c", (("a", "b"),), "简短回答。\n\nNo lists.")
    assert build_prompt(asked.query, list(asked.turns), asked.system) == (
        "[Round 0]\n问：简短回答。\n\nNo lists.\n答：好的。\n[Round 1]\n问：a\n答：b\n[Round 2]\n问：c\n答：")
    assert parse_request({"messages": [{"role": "user", "content": "c"}]}, 1000).system is None  # the configured one
