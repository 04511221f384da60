"""The onnxruntime engine as a decoder plus a prefill strategy chosen at open, verification through the engine's public
prefill paths, the engine and target tables, and the prompt kernel's own refusals."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.bundle import Bundle, validate_manifest
from appliance.engines import ENGINES, EngineKind, EngineOptions
from appliance.engines.onnxruntime import OrtEngine
from appliance.errors import BundleError, EngineError
from appliance.kernels import prompt_kernels
from appliance.kernels.prompt_kernels import BAD_SHAPE, MISALIGNED, load
from appliance.model.weights import WEIGHT_PRECISIONS
from appliance.positions import layout_of
from appliance.targets import DECODER, STATIC, TARGETS
from model_export.export import export_bundle
from model_export.verify import PROMPT_KERNEL_MIN_COSINE, PROMPT_KERNEL_PROMPT, prompt_kernel_cosine
from streamchat.cli import build_parser, main
from tests.conftest import TINY

needs_kernel = pytest.mark.skipif(load() is None, reason="INT4 kernel not built or no AVX2 on this CPU")


def _prompt(tokenizer, text: str = PROMPT_KERNEL_PROMPT):
    ids = tokenizer.encode_prompt(text)
    special = tokenizer.special
    return np.array(ids), layout_of(ids, special.bos, special.gmask, special.mask)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# -- the prefill strategy is chosen when the bundle is opened ---------------------------------------------------------

@needs_kernel
def test_int4_bundles_prefill_on_the_kernel_the_others_in_the_graph(bundles):
    assert Bundle.open(bundles["int4"]).engine().prefill.name == "int4-kernel"
    assert Bundle.open(bundles["int4"]).engine(kernels=False).prefill.name == "graph"
    for quant in ("fp32", "fp16", "int8"):
        assert Bundle.open(bundles[quant]).engine().prefill.name == "graph"


def test_without_the_built_kernel_int4_bundles_prefill_in_the_graph(bundles):
    """An install without the compiled kernel (here: the extension made unimportable in a fresh interpreter)."""
    code = ("import sys, json; sys.modules['appliance.kernels._prompt_kernels'] = None\n"
            "from appliance.bundle import Bundle\nfrom appliance.kernels import prompt_kernels\n"
            f"engine = Bundle.open({str(bundles['int4'])!r}).engine()\n"
            "print(json.dumps([engine.prefill.name, prompt_kernels.status()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    name, status = json.loads(out)
    assert name == "graph" and status.startswith("not built")


@needs_kernel
def test_the_kernel_strategy_hands_short_prompts_to_the_graph(bundles, tokenizer):
    engine = Bundle.open(bundles["int4"]).engine()
    ids, layout = _prompt(tokenizer, "你好")
    assert len(ids) < 16 and not engine.prefill.takes(ids, layout.mask())
    graph = Bundle.open(bundles["int4"]).engine(kernels=False)
    got, want = (e.start().prefill(ids, layout.position_ids(), layout.mask()) for e in (engine, graph))
    np.testing.assert_array_equal(got, want)


def test_a_prompt_longer_than_the_cache_is_refused_with_the_sizes(bundles, tokenizer):
    engine = Bundle.open(bundles["fp32"]).engine(context=20)
    ids, layout = _prompt(tokenizer)
    assert len(ids) > 20
    with pytest.raises(EngineError, match=f"the prompt has {len(ids)} tokens; the KV cache holds 20 positions"):
        engine.start().prefill(ids, layout.position_ids(), layout.mask())


# -- verification asks the engine for its prefill paths -------------------------------------------------------------

@needs_kernel
def test_an_int4_engine_offers_both_paths_on_one_decoder(bundles, tokenizer):
    engine = Bundle.open(bundles["int4"]).engine()
    ids, layout = _prompt(tokenizer)
    paths = engine.prefill_paths(ids, layout.mask())
    assert list(paths) == ["int4-kernel", "graph"] and paths["int4-kernel"] is engine
    assert paths["graph"].decoder is engine.decoder and paths["graph"].prefill.name == "graph"
    kernel_sequence = engine.start()
    kernel = kernel_sequence.prefill(ids, layout.position_ids(), layout.mask())
    graph = paths["graph"].start().prefill(ids, layout.position_ids(), layout.mask())
    with pytest.raises(EngineError, match="retired"):  # one cache: the graph path's sequence retired the kernel's
        kernel_sequence.step(int(ids[-1]), layout.step_position(len(ids) + 1))
    cosine = _cosine(kernel, graph)
    assert cosine >= PROMPT_KERNEL_MIN_COSINE and kernel.argmax() == graph.argmax()
    assert prompt_kernel_cosine(engine, tokenizer) == pytest.approx(cosine, abs=1e-9)
    short_ids, short = _prompt(tokenizer, "你好")
    assert list(engine.prefill_paths(short_ids, short.mask())) == ["graph"]


def test_engines_with_one_path_are_not_compared(bundles, tokenizer):
    engine = Bundle.open(bundles["fp32"]).engine()
    ids, layout = _prompt(tokenizer)
    assert engine.prefill_paths(ids, layout.mask()) == {"graph": engine}
    assert prompt_kernel_cosine(engine, tokenizer) is None


class _PublicOnly:
    """An engine seen only through the BundleEngine protocol: verification must need nothing else."""

    def __init__(self, engine: OrtEngine) -> None:
        self._engine = engine
        self.name, self.max_context = engine.name, engine.max_context

    def start(self):
        return self._engine.start()

    def prefill_paths(self, ids, mask):
        return {name: _PublicOnly(path) for name, path in self._engine.prefill_paths(ids, mask).items()}


@needs_kernel
def test_verification_uses_only_the_public_engine_protocol(bundles, tokenizer):
    engine = Bundle.open(bundles["int4"]).engine()
    assert prompt_kernel_cosine(_PublicOnly(engine), tokenizer) >= PROMPT_KERNEL_MIN_COSINE


def test_export_and_verification_import_no_runtime_internals():
    code = ("import sys, json\nimport model_export.export, model_export.verify, appliance.model.quantize\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('appliance.kernels', 'appliance.engines.')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert json.loads(out) == []


def test_the_engine_table_imports_no_engine_module():
    """The runtime core reads the tables without onnx or onnxruntime; an engine's module loads when a bundle opens."""
    code = ("import sys, json\nsys.modules.update(onnx=None, onnxruntime=None)\n"
            "import appliance.bundle, appliance.engines, appliance.targets\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('appliance.engines.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert json.loads(out) == []


# -- the engine and target tables -----------------------------------------------------------------------------------

def test_every_table_entry_opens_and_every_target_runs_on_its_runtime():
    import importlib

    for kind in ENGINES.values():
        assert set(kind.opens) <= {DECODER, STATIC}
        for where in kind.opens.values():
            module, function = where.split(":")
            assert callable(getattr(importlib.import_module(module), function))
    for target in TARGETS.values():
        assert target.graphs in ENGINES[target.runtime].opens
        assert (target.shapes is not None) == (target.graphs == STATIC)


@pytest.mark.parametrize("target", [["cpu"], {"cpu": 1}, "gpu", None])
def test_a_manifest_names_a_target_of_the_table(bundles, target):
    manifest = json.loads((bundles["fp32"] / "manifest.json").read_text(encoding="utf-8"))
    with pytest.raises(BundleError, match="target must be one of cpu, ascend-910b, ascend-310b"):
        validate_manifest({**manifest, "target": target}, "manifest.json")


def _help(capsys, *argv: str) -> str:
    """The command's --help, unwrapped (argparse breaks lines at spaces and hyphens)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))


def test_the_cli_offers_every_engine_target_and_precision(capsys):
    for command in ("generate", "chat"):
        text = _help(capsys, command)
        assert all(f"{name} = " in text for name in ("auto", *ENGINES))
    text = _help(capsys, "export")
    assert all(f"{name} = " in text for name in TARGETS) and " | ".join(WEIGHT_PRECISIONS) in text


def test_an_unknown_engine_is_one_line(bundles, capsys):
    assert main(["generate", "--bundle", str(bundles["fp32"]), "--engine", "gpu", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown engine 'gpu': choose one of auto, onnxruntime, mindspore-lite, acl, mindspore\n"
    with pytest.raises(EngineError, match="targets cpu; it cannot run on engine mindspore-lite .engines for it: onnxruntime"):
        Bundle.open(bundles["fp32"]).engine(kind="mindspore-lite")


def open_graph_only(bundle: Bundle, options: EngineOptions) -> OrtEngine:
    """A registered engine's open function: here onnxruntime with its prompts always in the graph."""
    from appliance.engines.onnxruntime import open_bundle

    return open_bundle(bundle, EngineOptions(options.threads, options.context, kernels=False))


def test_an_engine_is_one_table_entry(bundles, tokenizer, monkeypatch, capsys):
    monkeypatch.setitem(ENGINES, "graph-only", EngineKind("graph-only", "onnxruntime without the prompt kernel",
                                                          {DECODER: "tests.test_engine_split:open_graph_only"}))
    engine = Bundle.open(bundles["int4"]).engine(kind="graph-only")
    assert isinstance(engine, OrtEngine) and engine.prefill.name == "graph"
    assert "graph-only = onnxruntime without the prompt kernel" in _help(capsys, "generate")
    assert main(["generate", "--bundle", str(bundles["int4"]), "--engine", "graph-only", "--prompt", "你好",
                 "--max-new-tokens", "2", "--greedy"]) == 0


def test_an_ascend_bundle_names_its_target_shapes_from_the_table(tmp_path, tokenizer):
    bundle = Bundle.open(export_bundle(TINY, tmp_path / "b", target="ascend-310b", quant="fp32").bundle)
    shapes = TARGETS["ascend-310b"].shapes
    capacity = min(shapes.capacity, bundle.config.max_sequence_length)
    assert bundle.manifest["runtime"] == TARGETS["ascend-310b"].runtime
    assert bundle.manifest["graphs"]["capacity"] == capacity
    assert bundle.manifest["graphs"]["prefill_gears"] == sorted({min(g, capacity) for g in shapes.prefill_gears})
    engine = bundle.engine(kind="onnxruntime")
    ids, layout = _prompt(tokenizer)
    assert engine.prefill_paths(ids, layout.mask()) == {"graph": engine}
    assert prompt_kernel_cosine(engine, tokenizer) is None


# -- the C kernel refuses what it cannot handle, by return code -----------------------------------------------------

def _aligned(nbytes: int, offset: int = 0) -> np.ndarray:
    raw = np.zeros(nbytes + 128, np.uint8)
    start = -raw.ctypes.data % 64 + offset
    return raw[start:start + nbytes]


@needs_kernel
def test_the_gemm_returns_error_codes_for_bad_shapes_and_buffers():
    lib = load()
    m, k, g, n = 4, 256, 128, 32
    xq, xs, xo = _aligned(m * k), _aligned(m * k // g * 4), _aligned(m * k // g * 4)
    w, ws = _aligned(n * k // 2), _aligned(n * k // g * 4)
    y = np.full((m, n), 7.0, np.float32)
    scratch = _aligned(k * 16 + 4 * (k // g) * 16)

    def gemm(m=m, k=k, g=g, ldy=n, n0=0, n1=n, scratch=scratch, w=w, bias=None):
        return lib.sc_int4_gemm(xq.ctypes.data, xs.ctypes.data, xo.ctypes.data, m, k, g,
                                None if w is None else w.ctypes.data, ws.ctypes.data, bias, y.ctypes.data, ldy, n0, n1,
                                scratch.ctypes.data)

    for bad in ({"m": 3}, {"m": 0}, {"k": 200}, {"g": 48}, {"g": 512, "k": 512}, {"n1": 24}, {"n0": 16, "n1": 0},
                {"ldy": 16}):
        assert gemm(**bad) == BAD_SHAPE, bad
    assert gemm(scratch=_aligned(len(scratch), offset=16)) == MISALIGNED
    assert gemm(w=None) == MISALIGNED
    assert gemm(bias=ws.ctypes.data + 2) == MISALIGNED
    assert (y == 7.0).all()  # refused before touching memory
    assert gemm() == 0 and (y == 0.0).all()  # zero activations, zero weights' codes: exact zeros


@needs_kernel
def test_quantize_and_gelu_return_error_codes():
    lib = load()
    x = _aligned(8 * 256 * 4 + 4)
    codes, scales, offsets = _aligned(8 * 256), _aligned(8 * 2 * 4), _aligned(8 * 2 * 4)

    def quantize(x_at: int = x.ctypes.data, m: int = 8, g: int = 128) -> int:
        return lib.sc_quantize_rows(x_at, m, 256, g, codes.ctypes.data, scales.ctypes.data, offsets.ctypes.data)

    assert quantize(m=6) == BAD_SHAPE and quantize(g=64 + 8) == BAD_SHAPE
    assert quantize(x_at=x.ctypes.data + 1) == MISALIGNED
    assert quantize() == 0
    values = np.array([1.0, -1.0, 0.0], np.float32)
    assert lib.sc_gelu(values.ctypes.data + 1, 2) == MISALIGNED and lib.sc_gelu(None, 3) == MISALIGNED
    assert lib.sc_gelu(None, 0) == 0
    assert lib.sc_gelu(values.ctypes.data, 3) == 0 and values[2] == 0 and values[0] == pytest.approx(0.8412, abs=1e-4)
    with pytest.raises(EngineError, match="refused a call to sc_gelu: a misaligned or missing buffer"):
        prompt_kernels.check(lib.sc_gelu(None, 3), "sc_gelu")


def test_the_c_and_python_refusal_codes_agree():
    text = Path(prompt_kernels.__file__).with_suffix(".c").read_text(encoding="utf-8")
    assert f"SC_BAD_SHAPE = {BAD_SHAPE}, SC_MISALIGNED = {MISALIGNED}, SC_NO_AVX2 = {prompt_kernels.NO_AVX2}" in text
