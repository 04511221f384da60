"""Decode steps on the C kernels: the repacked GEMV against the integer arithmetic it promises, the recorded step's
refusals, and the engine that runs the step against onnxruntime's decode and the numpy reference."""

from __future__ import annotations

import mmap
from types import SimpleNamespace

import numpy as np
import pytest

from appliance.bundle import Bundle
from appliance.engines.kernel_decode import KernelDecoder
from appliance.engines.onnxruntime import OrtDecoder
from appliance.engines.residency import file_mappings
from appliance.errors import EngineError
from appliance.kernels import native
from appliance.kernels.decode_kernels import DecodeKernels
from appliance.kernels.prompt_kernels import Int4Weight, load
from appliance.kernels.step_program import (
    ATTEND,
    COPY,
    FIELDS,
    LOGITS,
    Head,
    PackedLinear,
    StepProgram,
    StepRecorder,
)
from appliance.model.quantize import quantize_blockwise
from appliance.positions import layout_of
from model_export.export import export_bundle
from model_export.synthetic import write_checkpoint
from tests.test_prompt_kernels import PATHS, _emulated, _integer_case, _rounding, needs_kernel

# The smallest widths the step's GEMV takes (K and N in whole groups of 128): 2 layers, 4 heads of 64.
WIDE = {"hidden_size": 256, "num_attention_heads": 4, "inner_hidden_size": 1024, "max_sequence_length": 160}
PROMPT = "StreamChat 是一个离线聊天设备。请用三句话介绍一下你自己。"
STEPS = 12
# Both decoders quantize each layer's input row to int8 per group of 128 and add the same integer dots in another
# order, and both keep an fp16 cache: measured 0.99997 at every step of the 256-wide bundle; a wrong rotary, scale
# or cache position lands far below.
STEP_MIN_COSINE = 0.9999


class _OneMatrix:
    """The weights of a recording that multiplies its input by one matrix."""

    def __init__(self, weight: PackedLinear) -> None:
        self.weight = weight

    def linear(self, name: str) -> PackedLinear:
        return self.weight


def _packed_gemv(kernel: str, threads: int = 2):
    """``x -> W x + b`` for one row through a recorded one-instruction program on repacked weights."""
    def run(x: np.ndarray, weight: Int4Weight) -> np.ndarray:
        packed = PackedLinear.of(weight, load())
        recorder = StepRecorder(SimpleNamespace(hidden_size=weight.k), _OneMatrix(packed), threads)
        program = StepProgram(recorder, recorder.linear("w", recorder.embed(None)))
        program.inputs["embedding"][0] = x
        DecodeKernels(load(), threads, kernel).run(program, 0)
        return program.output[0].copy()
    return run


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("k, n", [(128, 4), (256, 36), (4096, 100), (16384, 48), (32768, 8)])
def test_the_repacked_gemv_matches_the_int8_activation_arithmetic(kernel, k, n):
    rng = np.random.default_rng(k + n)
    q = quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32), 4, 128)
    x = rng.standard_normal(k).astype(np.float32) * 3
    bias = rng.standard_normal(n).astype(np.float32)
    got = _packed_gemv(kernel)(x, Int4Weight(q.packed, q.scales, bias))
    assert got.shape == (n,)
    assert (np.abs(got - _emulated(x[None], q)[0] - bias) <= _rounding(x, q) + 1e-5).all()


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("threads", [1, 3])
def test_the_repacked_gemv_is_exact_on_integers(kernel, threads):
    x, weight, want = _integer_case(3, 1024, 68, 128, seed=threads)
    gemv = _packed_gemv(kernel, threads)
    for row in range(len(x)):
        np.testing.assert_array_equal(gemv(x[row], weight), want[row])


class _OneHead:
    """The weights of a recording that computes the logits of its input."""

    def __init__(self, head: Head) -> None:
        self.table = head

    def head(self) -> Head:
        return self.table


def _step_logits(kernel: str, x: np.ndarray, head: Head) -> np.ndarray:
    recorder = StepRecorder(SimpleNamespace(hidden_size=x.size), _OneHead(head), 2)
    program = StepProgram(recorder, recorder.lm_head(recorder.embed(None)))
    program.inputs["embedding"][0] = x
    DecodeKernels(load(), 2, kernel).run(program, 0)
    return program.output.copy()


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("group", [32, 128, 256])
def test_the_steps_8_bit_logits_match_the_int8_activation_arithmetic(kernel, group):
    """An 8-bit lm_head meets the row quantized to int8 per group, as the graph's accuracy level 4 computes it."""
    rng = np.random.default_rng(group)
    q = quantize_blockwise(rng.standard_normal((150, 1024)).astype(np.float32), 8, group)
    x = rng.standard_normal(1024).astype(np.float32) * 3
    got = _step_logits(kernel, x, Head(q.packed, q.scales, 8, group))
    groups = x.reshape(-1, group)
    scale = np.abs(groups).max(-1) / np.float32(127)
    codes = np.rint(groups * (np.float32(1) / scale)[:, None]).astype(np.int64)
    dots = np.einsum("bg,nbg->nb", codes, q.packed.astype(np.int64) - 128)
    want = np.einsum("nb,b,nb->n", dots.astype(np.float64), scale, q.scales)
    magnitudes = np.einsum("bg,nbg->n", np.abs(codes) * scale[:, None], np.abs(q.packed.astype(np.float64) - 128)
                           * q.scales[..., None])
    assert (np.abs(got - want) <= 2e-6 * magnitudes + 1e-5).all()
    exact = q.dequantize() @ x  # and within the activations' rounding of the exact product
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.01


@needs_kernel
@pytest.mark.parametrize("kernel", PATHS)
def test_the_steps_4_bit_logits_are_fp32_products(kernel):
    rng = np.random.default_rng(4)
    q = quantize_blockwise(rng.standard_normal((70, 512)).astype(np.float32), 4, 128)
    x = rng.standard_normal(512).astype(np.float32)
    got = _step_logits(kernel, x, Head(q.packed, q.scales, 4, 128))
    np.testing.assert_allclose(got, q.dequantize().astype(np.float64) @ x, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_repacking_refuses_what_it_cannot_lay_out():
    lib = load()
    q = quantize_blockwise(np.ones((6, 256), np.float32), 4, 128)
    codes = np.empty(q.packed.nbytes, np.uint8)
    assert lib.sc_repack_int4(q.packed.ctypes.data, 6, 256, codes.ctypes.data) == native.BAD_SHAPE  # N not in fours
    assert lib.sc_repack_int4(q.packed.ctypes.data, 4, 200, codes.ctypes.data) == native.BAD_SHAPE
    assert lib.sc_repack_int4(None, 4, 256, codes.ctypes.data) == native.MISALIGNED
    for weight in (Int4Weight(q.packed, q.scales), Int4Weight(*_thirty_two_groups())):
        with pytest.raises(ValueError, match="is not repacked"):
            PackedLinear.of(weight, lib)


def _thirty_two_groups() -> tuple[np.ndarray, np.ndarray]:
    q = quantize_blockwise(np.ones((8, 256), np.float32), 4, 32)
    return q.packed, q.scales


# -- the engine ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """An INT4 bundle the kernel decoder takes (its export verified the kernel decoder against the reference)."""
    root = tmp_path_factory.mktemp("wide")
    checkpoint = write_checkpoint(root / "checkpoint", layers=2, seed=11, widths=WIDE)
    return export_bundle(checkpoint, root / "int4", quant="int4").bundle


def _prompt(bundle: Bundle, text: str = PROMPT):
    tok = bundle.tokenizer()
    ids = tok.encode_prompt(text)
    special = tok.special
    return np.array(ids), layout_of(ids, special.bos, special.gmask, special.mask)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _teacher_forced(engines, ids, layout, steps: int = STEPS) -> list[list[np.ndarray]]:
    """Each engine's logits for the prompt and then ``steps`` tokens chosen greedily by the last engine."""
    seqs = [e.start() for e in engines]
    out = [[s.prefill(ids, layout.position_ids(), layout.mask())] for s in seqs]
    total = len(ids)
    for _ in range(steps):
        token = int(out[-1][-1].argmax())
        total += 1
        for seq, logits in zip(seqs, out, strict=True):
            logits.append(seq.step(token, layout.step_position(total)))
    return out


@needs_kernel
def test_int4_bundles_decode_on_the_kernels_as_onnxruntime_does(wide):
    kernel, graph = Bundle.open(wide).engine(), Bundle.open(wide).engine(kernels=False)
    assert isinstance(kernel.decoder, KernelDecoder) and kernel.prefill.name == "int4-kernel"
    assert isinstance(graph.decoder, OrtDecoder) and graph.prefill.name == "graph"
    ids, layout = _prompt(Bundle.open(wide))
    ours, theirs = _teacher_forced([kernel, graph], ids, layout)
    cosines = [_cosine(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert min(cosines) >= STEP_MIN_COSINE, cosines
    assert [int(a.argmax()) for a in ours] == [int(b.argmax()) for b in theirs]
    assert kernel.decoder.graph is None  # no onnxruntime session was opened


@needs_kernel
def test_the_bundles_pages_leave_once_the_weights_are_repacked(wide):
    engine = Bundle.open(wide).engine()
    data = engine.prefill.rows.tensors.map
    pages = -(-len(data) // mmap.PAGESIZE) * mmap.PAGESIZE
    mappings = [m for m in file_mappings(wide / "decoder.onnx.data") if m[1] - m[0] == pages]
    assert mappings and all(resident == 0 for _, _, resident, _ in mappings)
    assert engine.decoder.weights.linears  # and the copy is the engine's own memory
    assert all(not np.shares_memory(w.codes, np.frombuffer(data, np.uint8)) for w in
               engine.decoder.weights.linears.values())


@needs_kernel
def test_a_short_prompt_stays_on_the_kernels(wide):
    """Beside the kernel decoder even a prompt of a few tokens prefills on the kernels: the graph would open a
    second copy of the weights."""
    kernel, graph = Bundle.open(wide).engine(), Bundle.open(wide).engine(kernels=False)
    ids, layout = _prompt(Bundle.open(wide), "Hi")
    assert len(ids) < 16 and kernel.prefill.takes(ids, layout.mask())
    ours, theirs = _teacher_forced([kernel, graph], ids, layout, steps=4)
    assert min(_cosine(a, b) for a, b in zip(ours, theirs, strict=True)) >= STEP_MIN_COSINE
    assert kernel.decoder.graph is None


@needs_kernel
def test_the_graph_prefill_writes_the_cache_the_kernel_steps_read(wide):
    engine, graph = Bundle.open(wide).engine(), Bundle.open(wide).engine(kernels=False)
    ids, layout = _prompt(Bundle.open(wide))
    paths = engine.prefill_paths(ids, layout.mask())
    assert list(paths) == ["int4-kernel", "graph"] and paths["graph"].decoder is engine.decoder
    ours, theirs = _teacher_forced([paths["graph"], graph], ids, layout, steps=6)
    assert isinstance(engine.decoder.graph, OrtDecoder) and engine.decoder.graph.cache is engine.decoder.cache
    assert min(_cosine(a, b) for a, b in zip(ours, theirs, strict=True)) >= STEP_MIN_COSINE
    first = paths["graph"].start()
    engine.start()  # a new sequence on either path retires the other's
    with pytest.raises(EngineError, match="retired"):
        first.step(1, layout.step_position(1))


@needs_kernel
def test_a_full_cache_is_refused_in_one_line(wide):
    ids, layout = _prompt(Bundle.open(wide), "Hi")
    engine = Bundle.open(wide).engine(context=len(ids) + 3)
    seq = engine.start()
    seq.prefill(ids, layout.position_ids(), layout.mask())
    for n in range(3):
        assert np.isfinite(seq.step(5, layout.step_position(len(ids) + 1 + n))).all()
    with pytest.raises(EngineError, match=f"holds {len(ids) + 3} positions and is full"):
        seq.step(5, layout.step_position(len(ids) + 4))


@needs_kernel
def test_the_paths_decode_alike(wide, monkeypatch):
    """Each path this CPU has, forced through the environment, decodes the same tokens."""
    available = [name for name in native.PATHS if name in native.cpu_features()]
    if len(available) < 2:
        pytest.skip(f"only {available} on this CPU: nothing to compare")
    ids, layout = _prompt(Bundle.open(wide))
    runs = {}
    for name in available:
        monkeypatch.setenv(native.ENV, name)
        native.choice.cache_clear()
        engine = Bundle.open(wide).engine()
        assert engine.decoder.kernels.kernel == name
        runs[name] = _teacher_forced([engine], ids, layout, steps=6)[0]
    native.choice.cache_clear()
    first, *others = runs.values()
    for other in others:
        assert min(_cosine(a, b) for a, b in zip(first, other, strict=True)) >= 0.99999


@needs_kernel
def test_the_step_refuses_a_program_that_does_not_fit_its_arena(wide):
    engine = Bundle.open(wide).engine(context=32)
    ids, layout = _prompt(Bundle.open(wide))
    seq = engine.start()
    seq.prefill(ids, layout.position_ids(), layout.mask())
    program, kernels = engine.decoder.program, engine.decoder.kernels
    assert program.code.shape[1] == FIELDS
    good = program.code.copy()
    program.output[:] = np.nan
    for field, value in [(1, program.arena.size), (2, -16), (0, 99)]:  # an offset past the arena, a negative one,
        program.code[:] = good                                          # an unknown operation
        program.code[len(good) // 2, field] = value
        with pytest.raises(EngineError, match="refused a call to sc_step_run: a shape it does not handle"):
            kernels.run(program, len(ids))
        assert np.isnan(program.output).all()  # nothing ran
    program.code[:] = good
    with pytest.raises(EngineError, match="a shape it does not handle"):
        kernels.run(program, 32)  # past the cache's capacity
    assert np.isnan(program.output).all()
    first = {op: int(np.flatnonzero(good[:, 0] == op)[0]) for op in (ATTEND, LOGITS, COPY)}
    for op, field, value in [(ATTEND, 7, 2**61 + 1),  # a head stride whose product with the heads wraps round
                             (LOGITS, 4, -(2**32) + 128),  # a group that is 128 only once cast to 32 bits
                             (COPY, 3, 0)]:  # a copy naming a second operand
        program.code[:] = good
        program.code[first[op], field] = value
        with pytest.raises(EngineError, match="a shape it does not handle"):
            kernels.run(program, len(ids))
        assert np.isnan(program.output).all()
    program.code[:] = good
    kernels.run(program, len(ids))
    assert np.isfinite(program.output).all()


class _Norms:
    def __init__(self, size: int) -> None:
        self.size = size

    def norm(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return np.ones(self.size, np.float32), np.zeros(self.size, np.float32)


def test_the_recorder_refuses_weights_that_do_not_fit_the_row():
    """C reads a LayerNorm's weights, an lm_head and a head split by the row's size: a mismatch is refused before."""
    recorder = StepRecorder(SimpleNamespace(hidden_size=256, num_heads=4, head_dim=16), _Norms(8), 2)
    x = recorder.embed(None)
    with pytest.raises(ValueError, match="a LayerNorm of 256 takes float32 weight and bias of that size"):
        recorder.layer_norm("n", x)
    with pytest.raises(ValueError, match="a row of 256 is not 4 heads of 3 x 16"):
        recorder.split_heads(x, 3)
    q = quantize_blockwise(np.ones((8, 128), np.float32), 8, 128)
    recorder.weights = _OneHead(Head(q.packed, q.scales, 8, 128))
    with pytest.raises(ValueError, match="does not take a row of 256 in 8-bit groups of 128"):
        recorder.lm_head(x)


@needs_kernel
def test_numpy_scalars_are_recorded_as_their_value():
    recorder = StepRecorder(SimpleNamespace(hidden_size=16), None, 1)
    x = recorder.embed(None)
    program = StepProgram(recorder, recorder.add(recorder.mul(x, np.float32(2.5)), np.int64(3)))
    program.inputs["embedding"][0] = np.arange(16, dtype=np.float32)
    DecodeKernels(load(), 1).run(program, 0)
    np.testing.assert_array_equal(program.output[0], np.arange(16) * 2.5 + 3)


def test_the_kernel_decoder_leaves_to_onnxruntime_what_the_step_cannot_take():
    for heads, hd in ((32, 12), (8192, 8), (2, 8192)):  # heads not in whole vectors, too many heads, too wide
        rows = SimpleNamespace(config=SimpleNamespace(num_heads=heads, head_dim=hd))
        assert KernelDecoder.open(rows, 64, "fp16", lambda: None) is None
    q = quantize_blockwise(np.ones((4, 128 * 257), np.float32), 4, 128)
    assert not PackedLinear.fits(Int4Weight(q.packed, q.scales))  # a row of more than 256 groups
