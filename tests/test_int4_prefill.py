"""Prompts of INT4 bundles through the C prompt kernel: same cache and logits as the graph's own prefill."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.bundle import Bundle
from appliance.engines import int4_prefill
from appliance.engines.int4_prefill import MIN_PROMPT, Int4Prefill
from appliance.engines.residency import file_mappings
from appliance.errors import EngineError
from appliance.kernels import native
from appliance.kernels.prompt_kernels import load
from appliance.model.weights import ATTENTION_DENSE, LINEARS, MLP_DOWN, MLP_UP, QUERY_KEY_VALUE, layer_prefix
from appliance.positions import layout_of
from model_export.export import ExportError, export_bundle
from model_export.verify import PROMPT_KERNEL_MIN_COSINE
from model_export.verify import PROMPT_KERNEL_PROMPT as PROMPT
from tests.conftest import TINY

needs_kernel = pytest.mark.skipif(load() is None, reason="INT4 kernel not built or no AVX2 on this CPU")


def _engine(bundles, quant: str = "int4", kernels: bool = True):
    return Bundle.open(bundles[quant]).engine(kernels=kernels)


def _prompt(tokenizer):
    ids = tokenizer.encode_prompt(PROMPT)
    special = tokenizer.special
    return ids, layout_of(ids, special.bos, special.gmask, special.mask)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


# The kernel path's logits come from an fp32 GEMV over the lm_head's codes, the graph's from MatMulNBits with its input
# quantized to int8, and the two paths quantize the layers' activations slightly differently (0.99997 measured).
PATHS_MIN_COSINE = 0.9999


@needs_kernel
def test_only_int4_bundles_take_the_kernel_path(bundles):
    assert _engine(bundles, "int4").prefill.name == "int4-kernel"
    for quant in ("fp32", "fp16", "int8"):
        assert _engine(bundles, quant).prefill.name == "graph"


@needs_kernel
def test_an_int4_bundle_with_an_unquantized_lm_head_keeps_the_graphs_prefill(tmp_path, tokenizer):
    """The kernels compute the logits from the lm_head's codes; an fp16 table has none, so the graph prefills."""
    bundle = export_bundle(TINY, tmp_path / "b", quant="int4", embeddings="fp16").bundle
    engine = Bundle.open(bundle).engine()
    assert engine.prefill.name == "graph"
    ids, layout = _prompt(tokenizer)
    logits = engine.start().prefill(np.array(ids), layout.position_ids(), layout.mask())
    assert logits.shape == (engine.config.vocab_size,) and np.isfinite(logits).all()


@needs_kernel
def test_kernel_prefill_gives_the_graphs_cache_logits_and_answer(bundles, tokenizer):
    ids, layout = _prompt(tokenizer)
    assert len(ids) >= MIN_PROMPT
    engines = [_engine(bundles, kernels=k) for k in (True, False)]
    assert engines[0].prefill.name == "int4-kernel" and engines[1].prefill.name == "graph"
    sequences = [e.start() for e in engines]
    logits = [s.prefill(np.array(ids), layout.position_ids(), layout.mask()) for s in sequences]
    assert _cos(*logits) > PATHS_MIN_COSINE and np.argmax(logits[0]) == np.argmax(logits[1])
    for kernel_cache, graph_cache in zip(engines[0].decoder.cache, engines[1].decoder.cache, strict=True):
        assert _cos(kernel_cache[0, :, :len(ids)], graph_cache[0, :, :len(ids)]) > 0.99999
    answers = [[], []]
    for total in range(len(ids) + 1, len(ids) + 9):  # greedy decoding continues identically
        for answer, last in zip(answers, logits, strict=True):
            answer.append(int(np.argmax(last)))
        logits = [s.step(a[-1], layout.step_position(total)) for s, a in zip(sequences, answers, strict=True)]
    assert answers[0] == answers[1]


@needs_kernel
def test_the_weights_pages_leave_the_process_after_a_prompt(bundles, tokenizer):
    engine = _engine(bundles, "int4")
    ids, layout = _prompt(tokenizer)
    engine.start().prefill(np.array(ids), layout.position_ids(), layout.mask())
    data = engine.prefill.rows.tensors.map
    mappings = [m for m in file_mappings(bundles["int4"] / "decoder.onnx.data") if m[1] - m[0] >= len(data)]
    assert mappings and all(resident == 0 for _, _, resident, _ in mappings)


@needs_kernel
def test_the_lm_head_is_mapped_a_chunk_at_a_time(bundles, tokenizer, monkeypatch):
    """The logits read the whole table; each chunk's pages leave the process before the next chunk is read, so the
    prompt's peak RSS never holds the table (0.53 GB for ChatGLM-6B)."""
    engine = _engine(bundles, "int4")
    rows = engine.prefill.rows
    table = rows.tensors[int4_prefill.HEAD + ".qweight"]
    monkeypatch.setattr(int4_prefill, "HEAD_ROWS", len(table) // 8)
    events, logits, release_rows = [], rows.kernels.logits, rows.tensors.release_rows
    monkeypatch.setattr(rows.kernels, "logits", lambda x, packed, *a: events.append(len(packed)) or logits(x, packed, *a))
    monkeypatch.setattr(rows.tensors, "release_rows", lambda name, r: events.append((name, r)) or release_rows(name, r))
    ids, layout = _prompt(tokenizer)
    engine.start().prefill(np.array(ids), layout.position_ids(), layout.mask())
    chunks = [slice(a, min(a + len(table) // 8, len(table))) for a in range(0, len(table), len(table) // 8)]
    assert events == [e for c in chunks for e in (c.stop - c.start, (int4_prefill.HEAD + ".qweight", c))]
    # and releasing a chunk's rows takes their pages out of the process
    tensors, data = rows.tensors, bundles["int4"] / "decoder.onnx.data"

    def resident() -> int:
        pages = -(-len(tensors.map) // mmap.PAGESIZE) * mmap.PAGESIZE
        return sum(m[2] for m in file_mappings(data) if m[1] - m[0] == pages)

    tensors.release()
    np.array(table[chunks[0]])
    touched = resident()
    release_rows(int4_prefill.HEAD + ".qweight", chunks[0])
    assert touched - resident() >= table[chunks[0]].nbytes // mmap.PAGESIZE * mmap.PAGESIZE - mmap.PAGESIZE > 0


def test_prompts_from_min_prompt_tokens_on_take_the_kernel(tokenizer):
    ids, _ = _prompt(tokenizer)
    assert Int4Prefill.takes(np.array(ids)) and Int4Prefill.takes(np.array(ids[:MIN_PROMPT]))
    assert not Int4Prefill.takes(np.array(ids[:MIN_PROMPT - 1]))


@needs_kernel
def test_the_kernel_follows_any_prefix_mask_as_the_graph_does(bundles, tokenizer):
    """Attention on the kernel path reads the prompt's own mask: a layout where an earlier row attends to the last one
    (no longer a causal tail) gives the graph's cache and logits."""
    ids, layout = _prompt(tokenizer)
    mask = layout.mask()
    mask[:, -1] = False  # every row attends to the last token too
    engines = [_engine(bundles, kernels=k) for k in (True, False)]
    logits = [e.start().prefill(np.array(ids), layout.position_ids(), mask) for e in engines]
    assert _cos(*logits) > PATHS_MIN_COSINE and np.argmax(logits[0]) == np.argmax(logits[1])
    for kernel_cache, graph_cache in zip(engines[0].decoder.cache, engines[1].decoder.cache, strict=True):
        assert _cos(kernel_cache[0, :, :len(ids)], graph_cache[0, :, :len(ids)]) > 0.99999
    unmasked = engines[0].start().prefill(np.array(ids), layout.position_ids(), layout.mask())
    assert _cos(logits[0], unmasked) < 0.9999  # the mask changed the answer: the test can tell them apart


def test_without_the_kernel_the_graph_prefills(bundles, tokenizer, monkeypatch):
    monkeypatch.setattr(int4_prefill, "load", lambda: None)
    engine = _engine(bundles, "int4")
    assert engine.prefill.name == "graph"
    ids, layout = _prompt(tokenizer)
    logits = engine.start().prefill(np.array(ids), layout.position_ids(), layout.mask())
    assert logits.shape == (engine.config.vocab_size,) and np.isfinite(logits).all()


@needs_kernel
def test_row_chunks_change_nothing(bundles, tokenizer, monkeypatch):
    """Long prompts go through the linear layers and attention a chunk of rows (and attention a group of heads) at a
    time; every row's and head's arithmetic is its own, so chunking must give the same cache and logits (up to
    numpy's float rounding of other shapes)."""
    ids, layout = _prompt(tokenizer)

    def prefill():
        engine = _engine(bundles)
        logits = engine.start().prefill(np.array(ids), layout.position_ids(), layout.mask())
        return logits, [c[0, :, :len(ids)].copy() for c in engine.decoder.cache]

    whole_logits, whole_cache = prefill()
    monkeypatch.setattr(int4_prefill, "ROWS", 8)
    monkeypatch.setattr(int4_prefill, "QUERY_CHUNK", 4)
    monkeypatch.setattr(int4_prefill, "HEAD_GROUP", 1)
    chunked_logits, chunked_cache = prefill()
    np.testing.assert_allclose(chunked_logits, whole_logits, rtol=1e-5, atol=1e-4)
    for a, b in zip(chunked_cache, whole_cache, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_export_verifies_the_prompt_kernel_too(bundles, tmp_path, monkeypatch):
    reports = {q: json.loads((bundles[q] / "verify_report.json").read_text()) for q in ("int4", "fp32")}
    assert reports["int4"]["prompt_kernel_cosine"] >= PROMPT_KERNEL_MIN_COSINE
    assert reports["fp32"]["prompt_kernel_cosine"] is None  # its prompts never run on the kernel
    # a kernel that forgot GELU agrees with the reference's decode steps but not with the graph's prefill
    monkeypatch.setattr(int4_prefill.PromptKernels, "gelu", lambda self, x: x)
    with pytest.raises(ExportError, match="verification failed.*prompt kernel vs graph prefill cosine"):
        export_bundle(TINY, tmp_path / "b", quant="int4")
    assert not (tmp_path / "b").exists()


@needs_kernel
def test_each_forced_path_prefills_and_the_paths_agree(bundles, tokenizer, monkeypatch):
    """STREAMCHAT_KERNEL picks the prompt path the engine takes; the paths' logits agree to the bit (same integer
    dots, summed in the same order), and onnxruntime means the graph's own prefill."""
    ids, layout = _prompt(tokenizer)
    logits = {}
    for forced in ("avx2", "avx512vnni", "onnxruntime"):
        monkeypatch.setenv(native.ENV, forced)
        native.choice.cache_clear()
        if forced != "onnxruntime" and forced not in native.cpu_features():
            with pytest.raises(EngineError, match=f"{forced} but this CPU lacks it"):
                _engine(bundles)
            continue
        engine = _engine(bundles)
        assert engine.prefill.name == ("graph" if forced == "onnxruntime" else "int4-kernel")
        if forced != "onnxruntime":
            assert engine.prefill.rows.kernels.kernel == forced
        logits[forced] = engine.start().prefill(np.array(ids), layout.position_ids(), layout.mask())
    native.choice.cache_clear()
    if {"avx2", "avx512vnni"} <= logits.keys():
        np.testing.assert_array_equal(logits["avx2"], logits["avx512vnni"])
    assert _cos(logits["avx2"], logits["onnxruntime"]) > PATHS_MIN_COSINE


def test_blas_keeps_one_thread_while_any_prompt_runs_and_gets_its_threads_back():
    """Two engines of one process prefilling at once: the first in limits numpy's BLAS to one thread, the last out
    restores it, whatever order they leave in."""
    from threadpoolctl import ThreadpoolController

    def blas_threads() -> set[int]:
        return {info["num_threads"] for info in ThreadpoolController().select(user_api="blas").info()}

    before = blas_threads()
    if before in (set(), {1}):
        pytest.skip(f"numpy's BLAS here has no threads to limit ({before or 'no BLAS found'})")
    limit = int4_prefill.PromptScope()
    limit.__enter__()  # the first prompt
    assert blas_threads() == {1}
    limit.__enter__()  # a second engine's prompt starts
    limit.__exit__(None, None, None)  # the first ends before the second
    assert blas_threads() == {1}
    limit.__exit__(None, None, None)
    assert blas_threads() == before


def test_the_last_prompt_out_gives_the_freed_temporaries_back_to_the_system():
    """glibc keeps freed memory inside its heap for reuse; the last prompt out returns it. Half of 2,000 100-KB arrays
    freed (not at the heap's top, so glibc keeps them) stay resident until the scope ends."""
    import ctypes

    if getattr(ctypes.CDLL(None), "malloc_trim", None) is None:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    script = """
import numpy as np
from appliance.engines.int4_prefill import PromptScope

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024

scope = PromptScope()
scope.__enter__()
arrays = [np.ones(100 * 1024 // 8) for _ in range(2000)]
del arrays[::2]
held = anon_mb()
scope.__enter__()
scope.__exit__(None, None, None)
after_first = anon_mb()
scope.__exit__(None, None, None)
print(held, after_first, anon_mb())
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=root)
    held, after_first, after_last = map(float, out.stdout.split())
    assert held - after_first < 20, "a prompt still running keeps the memory"
    assert held - after_last > 80, (held, after_last)


def test_a_prompts_temporaries_are_reused_not_faulted_in_again():
    """A layer's temporaries (2-8 MB arrays, allocated and freed in turn) come from memory the allocator kept once a
    prompt runs; glibc's adapting thresholds hand many of them back to the system and fault them in again. The same
    sequence three times in a fresh process each way, counting minor page faults."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("the thresholds are glibc's (this C library is not glibc)")
    script = """
import resource, sys
import numpy as np
from appliance.engines.int4_prefill import PROMPT_SCOPE

def layer():
    for megabytes in (2, 6, 2, 2, 2, 8, 8, 2, 2):
        a = np.ones(megabytes << 18, np.float32)
        b = a * 2
        del a, b

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        layer()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

layer()
if sys.argv[1] == "prompt":
    with PROMPT_SCOPE:
        layer()
        print(faults())
else:
    print(faults())
"""
    root = Path(__file__).resolve().parents[1]
    counts = {where: int(subprocess.run([sys.executable, "-c", script, where], capture_output=True, text=True,
                                        check=True, cwd=root).stdout)
              for where in ("prompt", "outside")}
    assert counts["outside"] > 3000, counts  # 64 MB of temporaries: 16 thousand 4-KB pages were they all fresh
    assert counts["prompt"] < 300, counts


@needs_kernel
def test_the_last_layer_goes_past_attention_for_the_last_row_only(bundles, tokenizer, monkeypatch):
    """Only the last row's logits leave a prompt: every layer writes every row's keys and values, but the last layer's
    attention output and MLP run on one row (the same logits and cache: test_kernel_prefill_gives_the_graphs_...)."""
    engine = _engine(bundles, "int4")
    rows = engine.prefill.rows
    seen: dict[str, int] = {}
    real = int4_prefill._KernelOps.linear

    def linear(ops, name, x):
        seen[name] = len(x)
        return real(ops, name, x)

    monkeypatch.setattr(int4_prefill._KernelOps, "linear", linear)
    ids, layout = _prompt(tokenizer)
    engine.start().prefill(np.array(ids), layout.position_ids(), layout.mask())
    last = rows.config.num_layers - 1
    assert len(seen) == 4 * rows.config.num_layers
    assert {seen[layer_prefix(n) + linear] for n in range(last) for linear in LINEARS} == {len(ids)}
    assert seen[layer_prefix(last) + QUERY_KEY_VALUE] == len(ids)
    assert {seen[layer_prefix(last) + linear] for linear in (ATTENTION_DENSE, MLP_UP, MLP_DOWN)} == {1}
