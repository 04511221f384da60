"""The mindspore engine's device choice (``--device`` / ``--device-id``, ``EngineOptions.device`` / ``device_id``: the
CPU in fp32, an Ascend NPU in fp16), where MindSpore writes a failed compile's dump, and its Cells exported to MindIR
and run back with
``mindspore.load`` + ``nn.GraphCell``. No NPU here: the Ascend path is checked up to MindSpore's device call (and its
fp16 arithmetic on MindSpore's CPU kernels), and MindSpore's refusal of the Ascend target is one line."""

from __future__ import annotations

import os

import numpy as np
import pytest

from appliance.bundle import Bundle
from appliance.positions import layout_of
from appliance.tokenizer import ChatGLMTokenizer
from model_export.checkpoint import Checkpoint
from model_export.export import export_bundle
from model_export.reference import ReferenceEngine, ReferenceModel
from model_export.verify import VERIFY_PROMPTS, compare_engines
from streamchat.cli import main
from tests.conftest import TINY
from tests.mindspore_required import require_mindspore

mindspore = require_mindspore("mindspore device tests")

INPUTS = ("positions", "bias", "slots", "last")  # the Cell's call inputs, held as Parameters (engine's ``feed``)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, object]:
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("ms-device")
    return {quant: export_bundle(TINY, root / quant, target="ascend-310b", quant=quant).bundle
            for quant in ("fp32", "fp16")}


def test_ascend_without_an_npu_is_one_line(bundles, monkeypatch, capsys):
    """MindSpore's own refusal here (a CPU-only wheel, no CANN), through the CLI."""
    code = main(["generate", "--bundle", str(bundles["fp32"]), "--engine", "mindspore", "--device", "ascend",
                 "--device-id", "1", "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (f"error: no Ascend device or CANN found (MindSpore {mindspore.__version__}, "
                       "device ascend, card 1): Unsupported device target Ascend. This process only "
                       "supports one of the ['CPU']"), err
    assert not any("Traceback" in line for line in err)


FLAG_CASES = [
    (["--device", "npu"], "device 'npu' is not one of cpu, ascend"),
    (["--device", "ascend", "--device-id", "-1"], "a device id is an NPU number such as 0, not '-1'"),
    (["--device-id", "0; rm"], "a device id is an NPU number such as 0, not '0; rm'"),
    (["--device-id", "\u00b2"], "a device id is an NPU number such as 0, not '\u00b2'"),
    (["--weights", "int2"], "weights 'int2' is not one of int8, int4 (or the bundle's own)"),
]
PAIR_CASES = [
    (["--engine", "onnxruntime", "--device", "ascend"], "engine onnxruntime runs on cpu, not on ascend (engines for "
                                                        "ascend: mindspore-lite, acl, mindspore)"),
    (["--engine", "acl"], "engine acl runs on ascend, not on cpu (engines for cpu: onnxruntime, mindspore-lite, "
                          "mindspore)"),
]


@pytest.mark.parametrize(("command", "flags", "message"), [
    *((command, *case) for command in ("generate", "chat", "serve") for case in FLAG_CASES),
    *(("generate", *case) for case in PAIR_CASES), *(("chat", *case) for case in PAIR_CASES),
])
def test_device_flags_are_checked_in_one_line(bundles, capsys, command, flags, message):
    """Every command that opens an engine checks --device, --device-id and --weights before loading anything, and the
    engine/device pair when the bundle is opened: one line, exit 2."""
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, "--bundle", str(bundles["fp32"]), *extra, *flags]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_help_names_the_device_flags(capsys):
    for command in ("generate", "chat", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--device {cpu,ascend}" in out and "--device-id N" in out and "--weights {int8,int4}" in out, out


def test_ascend_asks_for_the_npu_and_computes_in_fp16(bundles, monkeypatch):
    """With MindSpore's device call recorded instead of made, the engine asks for Ascend card 3 and holds its weights,
    rotary tables and cache in fp16 (LayerNorm parameters in fp32); run on MindSpore's CPU fp16 kernels, which round
    every op (unlike onnxruntime's CPU, which gets 0.0067 on the fp16 device graphs), its logits stay within 0.03 of
    the fp32 reference (0.024 measured) and pick the same tokens, and are visibly not fp32 arithmetic (> 1e-3)."""
    calls = []
    monkeypatch.setattr(mindspore, "set_device", lambda target, device_id=None: calls.append((target, device_id)))
    engine = Bundle.open(bundles["fp16"]).engine(kind="mindspore", device="ascend", device_id=3)
    assert calls == [("Ascend", 3)]
    state = engine.runner.state
    dtypes = {name: str(state.weights[i].dtype) for name, i in state.index.items()}
    assert dtypes["transformer.layers.0.attention.query_key_value.weight"] == "Float16"
    assert dtypes["transformer.layers.0.input_layernorm.weight"] == dtypes["transformer.final_layernorm.bias"] == "Float32"
    assert {str(c.dtype) for c in state.cache} == {str(state.cos.dtype)} == {"Float16"}
    reference = ReferenceEngine(ReferenceModel.from_checkpoint(Checkpoint(TINY)))
    metrics = compare_engines(engine, reference, ChatGLMTokenizer.from_dir(TINY), VERIFY_PROMPTS[:2], 6)
    assert metrics["agreement"] == 1.0 and 1e-3 < metrics["max_abs_diff"] <= 0.03, metrics


def test_a_failed_compile_dumps_into_the_cache_folder(tmp_path, monkeypatch):
    """MindSpore writes ``rank_0/om/analyze_fail.ir`` on a failed compile: under StreamChat's cache, not the working
    directory."""
    from mindspore import Tensor, nn, ops

    from appliance.engines.mindspore_engine import _mindspore

    monkeypatch.delenv("MS_OM_PATH", raising=False)
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    _mindspore()

    class Wrong(nn.Cell):
        def construct(self, x):
            return ops.matmul(x, x.reshape(7, 11))

    with pytest.raises(ValueError, match="analyze_fail.ir"):
        Wrong()(Tensor(np.ones(3, np.float32)))
    assert (tmp_path / "cache" / "mindspore" / "rank_0" / "om" / "analyze_fail.ir").is_file()
    assert not (tmp_path / "rank_0").exists()


def test_mindir_export_runs_back_with_the_engines_logits(bundles, tmp_path):
    """The prefill Cell of the smallest gear and the decode Cell as MindIR, loaded as GraphCells and fed what the
    engine's Cells were fed: the same logits over a prefill and 6 greedy steps, the cache carried as state (copied
    once from the prefill file's Parameters into the decode file's)."""
    from mindspore import Tensor, nn

    from model_export.mindspore_mindir import export_mindir

    bundle = Bundle.open(bundles["fp32"])
    gear = bundle.manifest["graphs"]["prefill_gears"][0]
    files = export_mindir(bundle, tmp_path / "mindir")
    assert files == {f"prefill:{gear}": tmp_path / "mindir" / f"prefill_{gear}.mindir",
                     "decode": tmp_path / "mindir" / "decode.mindir"}
    loaded = {key: nn.GraphCell(mindspore.load(str(path))) for key, path in files.items()}

    engine = bundle.engine(kind="mindspore")
    calls, run = [], engine.runner.run

    def recorded(graph, inputs):
        logits = run(graph, inputs)
        cell = engine.runner.cells[graph]
        calls.append((graph, inputs["input_ids"].astype(np.int32), {k: getattr(cell, k).asnumpy() for k in INPUTS},
                      logits))
        return logits

    engine.runner.run = recorded
    config = bundle.config
    ids = [5, 6, 7, config.gmask_token_id, config.bos_token_id]
    layout = layout_of(ids, config.bos_token_id, config.gmask_token_id, config.mask_token_id)
    sequence = engine.start()
    logits = sequence.prefill(np.array(ids), layout.position_ids(), layout.mask())
    for n in range(6):
        logits = sequence.step(int(logits.argmax()), layout.step_position(len(ids) + n + 1))
    assert [graph for graph, *_ in calls] == [f"prefill:{gear}"] + ["decode"] * 6

    for n, (graph, input_ids, fed, want) in enumerate(calls):
        cell = loaded[graph]
        params = cell.parameters_dict()
        if n == 1:  # the first step: the prefill file's cache into the decode file's
            for name, value in loaded[f"prefill:{gear}"].parameters_dict().items():
                if name.startswith("cache."):
                    params[name].set_data(Tensor(value.asnumpy()))
        length = input_ids.shape[1]
        for name, value in fed.items():
            params[f"in{length}.{name}"].set_data(Tensor(value))
        np.testing.assert_allclose(cell(Tensor(input_ids)).asnumpy(), want, rtol=0, atol=1e-5, err_msg=graph)
