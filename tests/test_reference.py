"""The numpy reference against what THUDM's own code recorded in golden.json."""

import numpy as np
import pytest

from appliance.positions import layout_of
from tests.conftest import GOLDEN, PROMPTS

TOL = 1e-4


def _prompt_forward(reference, prompt, **kw):
    ids = prompt["prompt_input_ids"]
    cfg = reference.config
    layout = layout_of(ids, cfg.bos_token_id, cfg.gmask_token_id, cfg.mask_token_id)
    return layout, reference.forward(np.array([ids]), layout.position_ids()[None], layout.mask()[None, None], **kw)


@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=lambda p: p["name"])
def test_positions_and_mask(reference, prompt):
    cfg = reference.config
    layout = layout_of(prompt["prompt_input_ids"], cfg.bos_token_id, cfg.gmask_token_id, cfg.mask_token_id)
    assert layout.context_length == prompt["attention_mask"]["context_length"]
    assert layout.mask_position == prompt["attention_mask"]["mask_position"]
    assert layout.position_ids().tolist() == prompt["position_ids"]
    assert ["".join("1" if v else "0" for v in row) for row in layout.mask()] == prompt["attention_mask"]["rows"]


@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=lambda p: p["name"])
def test_prompt_forward_matches_golden(reference, prompt):
    _, out = _prompt_forward(reference, prompt, all_logits=True)
    last = out.logits[0, -1]
    rec = prompt["last_logits"]
    start = rec["text_rows"]["start_id"]
    np.testing.assert_allclose(last[start:], rec["text_rows"]["values"], atol=TOL, rtol=0)
    np.testing.assert_allclose(last[rec["image_row_subset"]["ids"]], rec["image_row_subset"]["values"], atol=TOL, rtol=0)
    np.testing.assert_allclose(last[rec["top20"]["ids"]], rec["top20"]["values"], atol=TOL, rtol=0)
    if rec["full"] is not None:
        np.testing.assert_allclose(last, rec["full"], atol=TOL, rtol=0)
    assert int(last.argmax()) == rec["argmax"]
    assert out.logits[0].argmax(-1).tolist() == prompt["all_positions"]["argmax"]
    np.testing.assert_allclose(out.logits[0].max(-1), prompt["all_positions"]["max"], atol=TOL, rtol=0)
    expected_hidden = prompt["hidden_states_last_position"]["values"]
    assert len(out.hidden_states) == len(expected_hidden)
    for got, want in zip(out.hidden_states, expected_hidden, strict=True):
        np.testing.assert_allclose(got[0], want, atol=TOL, rtol=0)
    assert list(out.past[0][0].shape) == prompt["kv_cache_shape_per_layer"]["key"]
    assert list(out.past[0][1].shape) == prompt["kv_cache_shape_per_layer"]["value"]


def test_decode_steps_with_kv_cache(reference):
    record = GOLDEN["decode_steps"]
    prompt = PROMPTS[record["prompt_name"]]
    layout, out = _prompt_forward(reference, prompt)
    past, ids = out.past, list(prompt["prompt_input_ids"])
    logits = out.logits[0]
    for step in record["steps"]:
        if step["step"] > 0:
            token = step["input_ids_fed"][0]
            ids.append(token)
            position = layout.step_position(len(ids))
            assert [[int(position[0])], [int(position[1])]] == step["position_ids_fed"]
            assert past[0][0].shape[0] == step["past_len_before"]
            out = reference.forward(np.array([[token]]), position.reshape(1, 2, 1), None, past)
            past, logits = out.past, out.logits[0]
        rec = step["logits"]
        np.testing.assert_allclose(logits[rec["text_rows"]["start_id"]:], rec["text_rows"]["values"], atol=TOL, rtol=0)
        assert int(logits.argmax()) == step["next_token_greedy"]


def test_left_padded_batch(reference):
    batch = GOLDEN["batch_left_padded"]
    ids = np.array(batch["input_ids"])
    positions = np.array(batch["position_ids"])
    mask = np.array([[[c == "1" for c in row] for row in rows] for rows in batch["attention_mask_rows"]])[:, None]
    out = reference.forward(ids, positions, mask)
    for row, top in enumerate(batch["last_logits_top20"]):
        np.testing.assert_allclose(out.logits[row][top["ids"]], top["values"], atol=TOL, rtol=0)
    # Greedy continuation as HF extends a bool mask: new column visible, new row copies the last row.
    generated = [[] for _ in ids]
    logits, past = out.logits, out.past
    for _ in range(8):
        tokens = logits.argmax(-1)
        for row, t in enumerate(tokens):
            generated[row].append(int(t))
        positions = positions[..., -1:].copy()
        positions[:, 1] += 1
        mask = np.concatenate([mask[:, :, -1:], np.zeros((len(ids), 1, 1, 1), dtype=bool)], axis=-1)
        out = reference.forward(tokens[:, None], positions, mask, past)
        logits, past = out.logits, out.past
    assert generated == batch["greedy_8_new_token_ids"]


def test_rotary_frequencies_are_fp16_rounded():
    from appliance.model.definition import rotary_inv_freq

    used = GOLDEN["meta"]["rotary_inv_freq_used"]
    np.testing.assert_array_equal(rotary_inv_freq(8), np.array(used["values"], dtype=np.float32))
