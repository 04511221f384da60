"""The pyACL runner of Ascend 310B boards, tested up to the ``acl`` calls: no NPU or CANN here, so a fake ``acl``
module implements the subset the runner calls, as pyACL documents it.

The fake keeps device memory as bytearrays behind integer pointers and host memory as the real addresses of the
``bytes`` objects ``acl.util.bytes_to_ptr`` was given. ``acl.rt.memcpy`` fails, as the real one does, on a copy the two
pointers do not allow (its kind must also name the direction) or on sizes that do not fit; an ACL context is current per
thread; ``acl.mdl.execute`` runs the ONNX graph an ``.om`` path stands for with onnxruntime, reading its input buffers'
bytes and writing its output buffers' bytes, and refuses an output buffer that is also an input. It counts every byte
copied between host and device, and every object still alive (leaks).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from appliance.bundle import Bundle
from appliance.conversion import gear_of
from appliance.engines import EngineOptions
from appliance.engines.acl_runner import AclGraphRunner, atc_command, om_file, open_on_acl
from appliance.engines.static import OrtGraphRunner, StaticEngine
from appliance.errors import EngineError
from appliance.generation import GenerationConfig, StreamGenerator
from appliance.positions import layout_of
from model_export.export import export_bundle
from model_export.verify import compare_engines
from tests.conftest import GOLDEN, TINY

SUCCESS, INVALID_PARAM, REPEAT_INITIALIZE, CONTEXT_NULL, MODEL_PATH_INVALID = 0, 100000, 100002, 107002, 145002
KINDS = {1: ("host", "device"), 2: ("device", "host"), 3: ("device", "device")}  # memcpy kind: (source, destination)
ACL_TYPES = {"tensor(float)": (0, np.float32), "tensor(float16)": (1, np.float16), "tensor(int32)": (3, np.int32)}
DEVICE_BASE = 1 << 56  # above every host address


def api(call: str, returns_value: bool = False):
    """A pyACL call: counted, and failing with ``fail``'s code on its ``fail``-th call."""
    def wrap(method):
        @functools.wraps(method)
        def call_it(self, *args):
            self.calls[call] += 1
            if self.fail and self.fail[:2] == (call, self.calls[call]):
                return (0, self.fail[2]) if returns_value else self.fail[2]
            return method(self, *args)
        return call_it
    return wrap


class FakeAcl:
    """``acl``, ``acl.rt``, ``acl.mdl`` and ``acl.util`` as far as the runner uses them; ``models`` maps each .om path
    to the ONNX graph it stands for; ``fail`` = (call, n, code) fails the n-th such call."""

    def __init__(self, models: dict[str, str], fail: tuple[str, int, int] | None = None):
        self.om, self.fail = models, fail
        self.calls: Counter = Counter()
        self.handles = itertools.count(1)
        self.initialized, self.devices, self.contexts = False, set(), set()
        self.memory: dict[int, bytearray] = {}
        self.host: dict[int, bytes] = {}
        self.sessions: dict[int, ort.InferenceSession] = {}
        self.descs: dict[int, int | None] = {}
        self.datasets: dict[int, list[int]] = {}
        self.buffers: dict[int, tuple[int, int]] = {}
        self.thread = threading.local()
        self.copies: list[tuple[int, int]] = []  # (device pointer, bytes) of every host<->device copy
        for module in ("rt", "mdl", "util"):
            prefix = module + "_"
            setattr(self, module, SimpleNamespace(**{name[len(prefix):]: getattr(self, name) for name in dir(self)
                                                     if name.startswith(prefix)}))

    def leaks(self) -> list[str]:
        alive = {"acl.init": self.initialized, "devices": self.devices, "contexts": self.contexts,
                 "device memory": self.memory, "models": self.sessions, "descs": self.descs,
                 "datasets": self.datasets, "data buffers": self.buffers}
        return [name for name, value in alive.items() if value]

    def _no_context(self) -> bool:
        return getattr(self.thread, "context", None) not in self.contexts

    # -- acl ----------------------------------------------------------------------------------------------------
    @api("acl.init")
    def init(self) -> int:
        if self.initialized:
            return REPEAT_INITIALIZE
        self.initialized = True
        return SUCCESS

    @api("acl.finalize")
    def finalize(self) -> int:
        self.initialized = False
        return SUCCESS

    def create_data_buffer(self, ptr: int, size: int) -> int:
        handle = next(self.handles)
        self.buffers[handle] = (ptr, size)
        return handle

    @api("acl.destroy_data_buffer")
    def destroy_data_buffer(self, handle: int) -> int:
        return SUCCESS if self.buffers.pop(handle, None) else INVALID_PARAM

    # -- acl.rt -------------------------------------------------------------------------------------------------
    @api("acl.rt.set_device")
    def rt_set_device(self, device: int) -> int:
        if not self.initialized:
            return INVALID_PARAM
        self.devices.add(device)
        return SUCCESS

    @api("acl.rt.reset_device")
    def rt_reset_device(self, device: int) -> int:
        if device not in self.devices:
            return INVALID_PARAM
        self.devices.discard(device)
        return SUCCESS

    @api("acl.rt.create_context", returns_value=True)
    def rt_create_context(self, device: int) -> tuple[int, int]:
        if device not in self.devices:
            return 0, INVALID_PARAM
        self.thread.context = next(self.handles)
        self.contexts.add(self.thread.context)
        return self.thread.context, SUCCESS

    @api("acl.rt.set_context")
    def rt_set_context(self, context: int) -> int:
        if context not in self.contexts:
            return CONTEXT_NULL
        self.thread.context = context
        return SUCCESS

    @api("acl.rt.destroy_context")
    def rt_destroy_context(self, context: int) -> int:
        if context not in self.contexts:
            return INVALID_PARAM
        self.contexts.discard(context)
        return SUCCESS

    @api("acl.rt.malloc", returns_value=True)
    def rt_malloc(self, size: int, policy: int) -> tuple[int, int]:
        if self._no_context() or size <= 0:
            return 0, CONTEXT_NULL if self._no_context() else INVALID_PARAM
        ptr = DEVICE_BASE + (next(self.handles) << 32)
        self.memory[ptr] = bytearray(size)
        return ptr, SUCCESS

    @api("acl.rt.free")
    def rt_free(self, ptr: int) -> int:
        return SUCCESS if self.memory.pop(ptr, None) is not None else INVALID_PARAM

    @api("acl.rt.memcpy")
    def rt_memcpy(self, dst: int, dst_max: int, src: int, count: int, kind: int) -> int:
        if self._no_context():
            return CONTEXT_NULL
        sides = ["device" if ptr in self.memory else "host" if ptr in self.host else None for ptr in (src, dst)]
        room = [len(self.memory[p]) if side == "device" else len(self.host[p]) if side == "host" else 0
                for p, side in zip((src, dst), sides, strict=True)]
        if KINDS.get(kind) != tuple(sides) or count > dst_max or dst_max > room[1] or count > room[0]:
            return INVALID_PARAM
        data = bytes(self.memory[src][:count]) if sides[0] == "device" else ctypes.string_at(src, count)
        if sides[1] == "device":
            self.memory[dst][:count] = data
        else:
            ctypes.memmove(dst, data, count)
        if sides[0] != sides[1]:
            self.copies.append((src if sides[0] == "device" else dst, count))
        return SUCCESS

    # -- acl.util -----------------------------------------------------------------------------------------------
    def util_bytes_to_ptr(self, data: bytes) -> int:
        if not isinstance(data, bytes):
            raise ValueError("needs an byte as argument")  # pyACL's own message
        ptr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        self.host[ptr] = data  # the real address, kept alive while the fake may be handed it
        return ptr

    # -- acl.mdl ------------------------------------------------------------------------------------------------
    @api("acl.mdl.load_from_file", returns_value=True)
    def mdl_load_from_file(self, path: str) -> tuple[int, int]:
        if self._no_context():
            return 0, CONTEXT_NULL
        if path not in self.om:
            return 0, MODEL_PATH_INVALID
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        model_id = next(self.handles)
        self.sessions[model_id] = ort.InferenceSession(self.om[path], options, providers=["CPUExecutionProvider"])
        return model_id, SUCCESS

    @api("acl.mdl.unload")
    def mdl_unload(self, model_id: int) -> int:
        return SUCCESS if self.sessions.pop(model_id, None) else INVALID_PARAM

    def mdl_create_desc(self) -> int:
        handle = next(self.handles)
        self.descs[handle] = None
        return handle

    @api("acl.mdl.get_desc")
    def mdl_get_desc(self, desc: int, model_id: int) -> int:
        if desc not in self.descs or model_id not in self.sessions:
            return INVALID_PARAM
        self.descs[desc] = model_id
        return SUCCESS

    @api("acl.mdl.destroy_desc")
    def mdl_destroy_desc(self, desc: int) -> int:
        return SUCCESS if self.descs.pop(desc, 0) != 0 else INVALID_PARAM

    def _io(self, desc: int, output: bool) -> list:
        session = self.sessions[self.descs[desc]]
        return session.get_outputs() if output else session.get_inputs()

    @staticmethod
    def _size(item) -> int:
        dims = [d if isinstance(d, int) else 1 for d in item.shape]  # batch 1, as ATC compiles it
        return int(np.prod(dims)) * np.dtype(ACL_TYPES[item.type][1]).itemsize

    def mdl_get_num_inputs(self, desc: int) -> int:
        return len(self._io(desc, False))

    def mdl_get_num_outputs(self, desc: int) -> int:
        return len(self._io(desc, True))

    def mdl_get_input_name_by_index(self, desc: int, index: int) -> str:
        return self._io(desc, False)[index].name

    def mdl_get_input_size_by_index(self, desc: int, index: int) -> int:
        return self._size(self._io(desc, False)[index])

    def mdl_get_output_size_by_index(self, desc: int, index: int) -> int:
        return self._size(self._io(desc, True)[index])

    def mdl_get_input_data_type(self, desc: int, index: int) -> int:
        return ACL_TYPES[self._io(desc, False)[index].type][0]

    def mdl_get_output_data_type(self, desc: int, index: int) -> int:
        return ACL_TYPES[self._io(desc, True)[index].type][0]

    def mdl_create_dataset(self) -> int:
        handle = next(self.handles)
        self.datasets[handle] = []
        return handle

    @api("acl.mdl.add_dataset_buffer", returns_value=True)
    def mdl_add_dataset_buffer(self, dataset: int, buffer: int) -> tuple[int, int]:
        if dataset not in self.datasets or buffer not in self.buffers:
            return 0, INVALID_PARAM
        self.datasets[dataset].append(buffer)
        return dataset, SUCCESS

    @api("acl.mdl.destroy_dataset")
    def mdl_destroy_dataset(self, dataset: int) -> int:
        return SUCCESS if self.datasets.pop(dataset, None) is not None else INVALID_PARAM

    @api("acl.mdl.execute")
    def mdl_execute(self, model_id: int, inputs: int, outputs: int) -> int:
        if self._no_context():
            return CONTEXT_NULL
        session = self.sessions[model_id]
        given = [self.buffers[b] for b in self.datasets[inputs]]
        taken = [self.buffers[b] for b in self.datasets[outputs]]
        if (len(given), len(taken)) != (len(session.get_inputs()), len(session.get_outputs())) or \
                {p for p, _ in given} & {p for p, _ in taken}:
            return INVALID_PARAM
        feeds = {}
        for item, (ptr, size) in zip(session.get_inputs(), given, strict=True):
            if ptr not in self.memory or size != self._size(item) or len(self.memory[ptr]) < size:
                return INVALID_PARAM
            dims = [d if isinstance(d, int) else 1 for d in item.shape]
            feeds[item.name] = np.frombuffer(bytes(self.memory[ptr][:size]), ACL_TYPES[item.type][1]).reshape(dims)
        for value, (ptr, size) in zip(session.run(None, feeds), taken, strict=True):
            data = np.ascontiguousarray(value).tobytes()
            if ptr not in self.memory or len(data) != size:
                return INVALID_PARAM
            self.memory[ptr][:size] = data
        return SUCCESS


# -- fixtures and helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("acl")
    return {q: Bundle.open(export_bundle(TINY, root / q, target="ascend-310b", quant=q).bundle) for q in ("fp32", "fp16")}


def om_models(bundle: Bundle, kind: str = "check") -> tuple[dict[str, str], dict[str, str]]:
    """(graph key -> .om path as a converted bundle names it, .om path -> the ONNX graph the fake runs for it)."""
    graphs = bundle.manifest["graphs"]
    files = {key: str(bundle.path / om_file(rel)) for key, rel in graphs["device"].items()}
    return files, {files[key]: str(bundle.path / rel) for key, rel in graphs[kind].items()}


def engine_on(bundle: Bundle, runner) -> StaticEngine:
    graphs = bundle.manifest["graphs"]
    return StaticEngine("acl", bundle.config, graphs["capacity"], graphs["prefill_gears"], runner,
                        bundle.tokenizer().special.pad)


def greedy_ids(engine, tokenizer, prompt_ids: list[int]) -> list[int]:
    config = GenerationConfig(greedy=True, max_new_tokens=24, repetition_penalty=1.0)
    return StreamGenerator(engine, tokenizer).run(prompt_ids, config).token_ids


def prefill(engine, tokenizer, ids: list[int]):
    special = tokenizer.special
    layout = layout_of(ids, special.bos, special.gmask, special.mask)
    sequence = engine.start()
    return sequence, layout, sequence.prefill(np.array(ids), layout.position_ids(), layout.mask())


# -- tests ------------------------------------------------------------------------------------------------------
def test_reproduces_the_reference_greedy_ids(bundles, reference_engine, tokenizer):
    """Prompts of 14 and 102 tokens: prefill gears 64 and 256 share the device cache with the decode step."""
    files, models = om_models(bundles["fp32"])
    fake = FakeAcl(models)
    runner = AclGraphRunner(files, acl=fake)
    engine = engine_on(bundles["fp32"], runner)
    for prompt in (GOLDEN["prompts"][0], GOLDEN["prompts"][4]):
        want = greedy_ids(reference_engine, tokenizer, prompt["prompt_input_ids"])
        assert greedy_ids(engine, tokenizer, prompt["prompt_input_ids"]) == want
        assert want == prompt["greedy"]["rp1.0"]["new_token_ids"]
    assert fake.leaks()
    runner.close()
    assert fake.leaks() == []
    runner.close()  # twice is harmless


def test_decode_host_traffic_does_not_depend_on_the_context(bundles, tokenizer):
    """A step copies its small inputs in and the logits out, at 15 or 103 tokens of context alike; the cache is never
    copied (every copy touches a request-input or logits buffer)."""
    bundle = bundles["fp32"]
    files, models = om_models(bundle)
    fake = FakeAcl(models)
    runner = AclGraphRunner(files, acl=fake)
    engine = engine_on(bundle, runner)
    cfg, capacity = bundle.config, engine.max_context
    expected = 4 * (1 + 2 + capacity + capacity) + 4 * cfg.vocab_size  # ids, positions, bias, write slot; logits
    cache_bytes = 2 * cfg.num_layers * cfg.num_heads * capacity * cfg.head_dim * 4
    per_step = []
    for prompt in (GOLDEN["prompts"][0], GOLDEN["prompts"][4]):
        ids = prompt["prompt_input_ids"]
        sequence, layout, logits = prefill(engine, tokenizer, ids)
        for total in range(len(ids) + 1, len(ids) + 4):
            before = sum(n for _, n in fake.copies)
            logits = sequence.step(int(logits.argmax()), layout.step_position(total))
            per_step.append((sequence.length, runner.host_bytes_last_run, sum(n for _, n in fake.copies) - before))
    assert {length for length, _, _ in per_step} >= {15, 103}
    assert {(bytes_, copied) for _, bytes_, copied in per_step} == {(expected, expected)}
    assert expected < cache_bytes
    buffers = {ptr for model in runner.models.values() for _, ptr, _, _ in model.inputs}
    buffers |= {model.logits for model in runner.models.values()}
    assert {ptr for ptr, _ in fake.copies} <= buffers
    runner.close()


def test_fp16_device_graphs_bind_like_onnxruntime(bundles, tokenizer):
    """fp16 graphs (fp16 cache, fp32 bias and logits, int32 ids): the same logits as OrtGraphRunner on them."""
    bundle = bundles["fp16"]
    files, models = om_models(bundle, "device")
    fake = FakeAcl(models)
    runner = AclGraphRunner(files, acl=fake)
    assert {t for m in runner.models.values() for _, _, _, t in m.inputs} == {np.int32, np.float32}
    ort_runner = OrtGraphRunner({k: str(bundle.path / v) for k, v in bundle.manifest["graphs"]["device"].items()}, 1)
    prompts = (GOLDEN["prompts"][0]["query"], GOLDEN["prompts"][4]["query"])
    metrics = compare_engines(engine_on(bundle, runner), engine_on(bundle, ort_runner), tokenizer, prompts, 6)
    assert metrics["max_abs_diff"] == 0.0 and metrics["agreement"] == 1.0, metrics
    runner.close()
    assert fake.leaks() == []


def test_runs_from_another_thread(bundles, tokenizer):
    """The ACL context is current per thread: a run on a thread that did not create it makes it current first."""
    files, models = om_models(bundles["fp32"])
    runner = AclGraphRunner(files, acl=FakeAcl(models))
    engine = engine_on(bundles["fp32"], runner)
    ids = GOLDEN["prompts"][0]["prompt_input_ids"]
    here = prefill(engine, tokenizer, ids)[2]
    there = []
    worker = threading.Thread(target=lambda: there.append(prefill(engine, tokenizer, ids)[2]))
    worker.start()
    worker.join()
    np.testing.assert_array_equal(there[0], here)
    runner.close()


def test_failing_call_is_one_line_naming_it(bundles, tokenizer):
    files, models = om_models(bundles["fp32"])
    fake = FakeAcl(models, fail=("acl.mdl.execute", 2, 507011))
    runner = AclGraphRunner(files, acl=fake)
    engine = engine_on(bundles["fp32"], runner)
    ids = GOLDEN["prompts"][0]["prompt_input_ids"]
    sequence, layout, logits = prefill(engine, tokenizer, ids)
    with pytest.raises(EngineError) as failure:
        sequence.step(int(logits.argmax()), layout.step_position(len(ids) + 1))
    assert str(failure.value) == "acl.mdl.execute failed with ACL error 507011 (details in CANN's log, ~/ascend/log)"
    with pytest.raises(EngineError, match="^graph decode takes the KV cache and none is kept"):
        sequence.step(int(logits.argmax()), layout.step_position(len(ids) + 1))  # the failed step's cache is unknown
    prefill(engine, tokenizer, ids)  # a new sequence works again
    runner.close()
    assert fake.leaks() == []


@pytest.mark.parametrize("call, n", [("acl.init", 1), ("acl.rt.create_context", 1), ("acl.mdl.load_from_file", 2),
                                     ("acl.mdl.get_desc", 3), ("acl.rt.malloc", 5), ("acl.mdl.add_dataset_buffer", 9)])
def test_failure_while_loading_releases_everything(bundles, call, n):
    files, models = om_models(bundles["fp32"])
    fake = FakeAcl(models, fail=(call, n, 145000))
    with pytest.raises(EngineError) as failure:
        AclGraphRunner(files, acl=fake)
    assert str(failure.value).startswith(call) and "ACL error 145000" in str(failure.value)
    assert fake.leaks() == []


def test_missing_model_file_names_the_path(bundles):
    files, models = om_models(bundles["fp32"])
    fake = FakeAcl({path: graph for path, graph in models.items() if not path.endswith("decode.om")})
    with pytest.raises(EngineError, match=r"^acl\.mdl\.load_from_file\(.*/om/decode\.om\) failed with ACL error 145002"):
        AclGraphRunner(files, acl=fake)
    assert fake.leaks() == []


def test_a_failed_release_is_reported_after_releasing_the_rest(bundles):
    files, models = om_models(bundles["fp32"])
    fake = FakeAcl(models, fail=("acl.rt.free", 1, 507899))
    runner = AclGraphRunner(files, acl=fake)
    with pytest.raises(EngineError, match=r"^pyACL did not release everything: acl\.rt\.free returned 507899$"):
        runner.close()
    assert fake.leaks() == ["device memory"] and len(fake.memory) == 1


def test_without_pyacl_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "acl", None)  # `import acl` raises ImportError
    with pytest.raises(EngineError, match=r"^pyACL \(acl\) is not importable: source "
                                          r"/usr/local/Ascend/ascend-toolkit/set_env\.sh"):
        AclGraphRunner({"decode": "om/decode.om"})


FAKE_ATC = """#!/usr/bin/env bash
# writes the arguments it was given into the offline model it would write
for arg in "$@"; do case "$arg" in --output=*) out=${arg#--output=} ;; esac; done
printf '%s\\n' atc "$@" > "$out.om"
"""


def test_convert_sh_atc_runs_atc_command_and_open_on_acl_runs_its_models(tmp_path, monkeypatch, reference_engine,
                                                                          tokenizer):
    """``convert.sh atc`` (ATC faked: it records its arguments) runs ``atc_command`` for every device graph and
    records om/<graph>.om; ``open_on_acl`` refuses the bundle before that and runs those models after."""
    path = export_bundle(TINY, tmp_path / "bundle", target="ascend-310b", quant="fp32").bundle
    with pytest.raises(EngineError, match=r"holds no om/prefill_64\.om, om/prefill_256\.om, om/decode\.om: convert it "
                                          r"on the board first \(\./convert\.sh atc"):
        open_on_acl(Bundle.open(path), EngineOptions())
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "atc").write_text(FAKE_ATC)
    (tmp_path / "bin" / "atc").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SOC_VERSION": "Ascend310B1"}
    done = subprocess.run(["./convert.sh", "atc"], cwd=path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    bundle = Bundle.open(path)
    graphs = bundle.manifest["graphs"]
    assert sorted(graphs["om"]) == sorted(om_file(rel) for rel in graphs["device"].values())
    for key, rel in graphs["device"].items():
        want = atc_command(rel, bundle.config, graphs["capacity"], gear_of(key), "Ascend310B1")
        ran = (path / om_file(rel)).read_text().splitlines()
        assert [a for a in ran if not a.startswith("--output=")] == [a for a in want if not a.startswith("--output=")]
        assert Path(next(a for a in ran if a.startswith("--output="))).name == Path(rel).stem
        if key == "decode":
            assert "--input_shape=input_ids:1,1;position_ids:1,2,1;attention_bias:1,1,1,256;write_slot:1,1,256,1;" \
                   "past_key.0:1,4,256,16;past_value.0:1,4,256,16;" in want[6]
    fake = FakeAcl(om_models(bundle)[1])
    monkeypatch.setitem(sys.modules, "acl", fake)
    engine = open_on_acl(bundle, EngineOptions())
    ids = GOLDEN["prompts"][0]["prompt_input_ids"]
    assert greedy_ids(engine, tokenizer, ids) == greedy_ids(reference_engine, tokenizer, ids)
    engine.runner.close()
    assert fake.leaks() == []
