"""The demo's training model (model_export/demo/train.py) is a torch backend of appliance.model.definition: on the
golden fixture's weights it computes the numpy reference's logits, and it trains (gradients reach every parameter).

torch is an optional extra (``pip install torch==2.13.0``); without it these tests are skipped with that reason."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from appliance.model.weights import EMBEDDING, LM_HEAD, expected_shapes
from appliance.positions import layout_of
from model_export.checkpoint import Checkpoint
from model_export.demo.corpus import read_corpus
from tests.conftest import GOLDEN, TINY

torch = pytest.importorskip("torch", reason="torch is not installed (the optional 'train' extra: "
                                            ".venv/bin/pip install torch==2.13.0)")

from model_export.demo.train import TinyChatGLM, encode_examples, train_step  # noqa: E402  (needs torch)


@pytest.fixture(scope="module")
def fixture_model(reference) -> TinyChatGLM:
    tensors = load_file(str(TINY / "model.safetensors"))
    np.testing.assert_array_equal(tensors.get(LM_HEAD, tensors[EMBEDDING]), tensors[EMBEDDING])  # tied, as the demo
    return TinyChatGLM(reference.config, tensors)


def _prompt(ids: list[int], cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layout = layout_of(ids, cfg.bos_token_id, cfg.gmask_token_id, cfg.mask_token_id)
    return np.array(ids)[None], layout.position_ids()[None], layout.mask()[None, None]


@pytest.mark.parametrize("index", range(len(GOLDEN["prompts"])))
def test_torch_backend_matches_the_reference_on_the_golden_fixture(fixture_model, reference, index):
    prompt = GOLDEN["prompts"][index]
    ids, positions, mask = _prompt(prompt["prompt_input_ids"], reference.config)
    with torch.no_grad():
        logits = fixture_model(*(torch.from_numpy(a) for a in (ids, positions, mask))).numpy()
    want = reference.forward(ids, positions, mask, all_logits=True).logits
    assert logits.shape == want.shape == (1, ids.shape[1], reference.config.vocab_size)
    assert np.abs(logits - want).max() < 1e-4
    top = prompt["last_logits"]["top20"]  # and the golden record itself
    np.testing.assert_allclose(logits[0, -1, top["ids"]], top["values"], atol=1e-4, rtol=0)


def test_parameters_are_the_checkpoint_tensors(fixture_model, reference):
    """One parameter per tensor a tied checkpoint stores, with its name and shape; the demo is written from them."""
    shapes = {name: shape for name, shape in expected_shapes(reference.config).items() if name != LM_HEAD}
    stored = fixture_model.state_dict_thudm()
    assert {name: a.shape for name, a in stored.items()} == shapes
    assert all(a.dtype == np.float16 for a in stored.values())
    assert sum(p.numel() for p in fixture_model.parameters()) == sum(int(np.prod(s)) for s in shapes.values())
    ckpt = Checkpoint(TINY)
    name = "transformer.layers.1.attention.query_key_value.weight"
    np.testing.assert_array_equal(stored[name], ckpt.tensor(name).astype(np.float16))


def test_one_training_step_reaches_every_parameter(reference, tokenizer):
    torch.manual_seed(0)
    model = TinyChatGLM(reference.config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = encode_examples(read_corpus()[:4], tokenizer, reference.config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    loss = train_step(model, opt, batch)
    # freshly initialised: about the entropy of a uniform guess over the vocabulary
    assert np.isfinite(loss.item()) and abs(loss.item() - np.log(reference.config.vocab_size)) < 1.0
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, f"{name} gets no gradient"
        assert not torch.equal(param.detach(), before[name]), f"{name} did not move"
    assert train_step(model, opt, batch).item() < loss.item()
