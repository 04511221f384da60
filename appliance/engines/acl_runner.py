"""A static bundle on an Ascend 310B board through pyACL: its graphs compiled by ATC to offline models (``.om``), run
by the ``acl`` module that ships with CANN.

The KV cache stays on the device. Two sets of device buffers hold it; every model's datasets are built once, binding
the presents (outputs 1..) of a run to one set and the decode step's ``past_*`` inputs to the other, so a step reads
the set the previous run wrote and writes the other one (ping-pong, never the buffer it reads). Per run only the
request's inputs go to the device and only the logits come back: a decode step's host traffic
(``host_bytes_last_run``) does not depend on the context length.

pyACL's conventions: CANN's pyACL reference (aclpythondevg: acl.mdl.load_from_file, get_input_name_by_index,
get_input_data_type, acl.util.bytes_to_ptr), its aclrtMemcpy page and Ascend/samples python/common/acllite
(acllite_model.py, acllite_resource.py). Calls return ``ret`` or ``(value, ret)``, 0 for success; an ACL context is
current per thread, so each run makes it current first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.conversion import input_shape_text
from appliance.engines import EngineOptions
from appliance.engines.lite_server import check_output_count
from appliance.engines.static import StaticEngine, static_engine
from appliance.errors import EngineError
from appliance.model_config import ModelConfig

if TYPE_CHECKING:
    from appliance.bundle import Bundle

OM_FOLDER = "om"
SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
HOST_TO_DEVICE, DEVICE_TO_HOST = 1, 2  # aclrtMemcpyKind
MALLOC_HUGE_FIRST = 0  # aclrtMemMallocPolicy
DTYPES = {0: np.float32, 1: np.float16, 3: np.int32}  # aclDataType: ACL_FLOAT, ACL_FLOAT16, ACL_INT32


def om_file(graph: str) -> str:
    """Where a bundle's offline model of ``graph`` (a device graph's file name) lives: ``om/<stem>.om``."""
    return f"{OM_FOLDER}/{Path(graph).stem}.om"


def atc_command(graph: str, cfg: ModelConfig, capacity: int, gear: int | None, soc_version: str) -> list[str]:
    """ATC's arguments compiling one static graph (batch 1) into ``om_file(graph)``, as ``convert.sh atc`` runs it.
    ``must_keep_origin_dtype`` keeps each op in the graph's own
    precision, fp32 softmax and layer norms included; ATC's default, ``force_fp16``, would run them in fp16."""
    return ["atc", "--framework=5", f"--model={graph}", f"--output={om_file(graph)[:-3]}",
            f"--soc_version={soc_version}", "--input_format=ND",
            f"--input_shape={input_shape_text(cfg, capacity, gear)}", "--precision_mode=must_keep_origin_dtype"]


def load_acl() -> Any:
    try:
        import acl
    except ImportError as exc:
        raise EngineError(f"pyACL (acl) is not importable: source {SET_ENV} (CANN's environment) first ({exc})") from None
    return acl


def _dtype(kind: int, what: str, graph: str) -> Any:
    if kind not in DTYPES:
        raise EngineError(f"{what} of graph {graph} has ACL data type {kind}; this runner takes int32, float16 and "
                          "float32: re-convert the bundle")
    return DTYPES[kind]


@dataclass
class _Model:
    model_id: int
    names: list[str]  # inputs in graph order
    input_sizes: list[int]
    input_types: list[int]
    output_sizes: list[int]  # logits, then the presents
    logits_type: int
    inputs: list[tuple[str, int, int, Any]] = field(default_factory=list)  # request inputs: name, pointer, bytes, dtype
    logits: int = 0  # device pointer
    reads: list[int] = field(default_factory=list)  # input dataset per cache set read (one if it takes no cache)
    writes: list[int] = field(default_factory=list)  # output dataset per cache set written

    @property
    def takes_cache(self) -> bool:
        return any(n.startswith("past_") for n in self.names)


class AclGraphRunner:
    """A GraphRunner over offline models (``files``: graph key -> .om path) on NPU ``device_id``; ``acl`` is the pyACL
    module (CANN's by default)."""

    def __init__(self, files: dict[str, str], device_id: int = 0, acl: Any = None) -> None:
        self.acl = acl or load_acl()
        self.device_id = device_id
        self.models: dict[str, _Model] = {}
        self.current: int | None = None  # the cache set the last run wrote
        self.host_bytes_last_run = 0
        self._releases: list[tuple[str, Callable[[], int]]] = []  # what close() undoes, newest last
        self.context = None
        try:
            self._open(files)
        except BaseException:
            with contextlib.suppress(EngineError):  # the failure that stopped the load is the one to report
                self.close()
            raise

    def _check(self, call: str, ret: int) -> None:
        if ret != 0:
            raise EngineError(f"{call} failed with ACL error {ret} (details in CANN's log, ~/ascend/log)")

    def _value(self, call: str, result: tuple[Any, int]) -> Any:
        self._check(call, result[1])
        return result[0]

    def _handle(self, call: str, handle: Any, release: Callable[[Any], int], name: str) -> Any:
        """A created object (0 when creation failed), released by ``release`` on close."""
        if not handle:
            raise EngineError(f"{call} failed (details in CANN's log, ~/ascend/log)")
        self._releases.append((name, lambda: release(handle)))
        return handle

    def _malloc(self, size: int) -> int:
        ptr = self._value("acl.rt.malloc", self.acl.rt.malloc(size, MALLOC_HUGE_FIRST))
        return self._handle("acl.rt.malloc", ptr, self.acl.rt.free, "acl.rt.free")

    def _dataset(self, buffers: list[tuple[int, int]]) -> int:
        acl = self.acl
        dataset = self._handle("acl.mdl.create_dataset", acl.mdl.create_dataset(), acl.mdl.destroy_dataset,
                               "acl.mdl.destroy_dataset")
        for ptr, size in buffers:
            buffer = self._handle("acl.create_data_buffer", acl.create_data_buffer(ptr, size), acl.destroy_data_buffer,
                                  "acl.destroy_data_buffer")
            self._value("acl.mdl.add_dataset_buffer", acl.mdl.add_dataset_buffer(dataset, buffer))
        return dataset

    def _open(self, files: dict[str, str]) -> None:
        acl, mdl = self.acl, self.acl.mdl
        self._check("acl.init", acl.init())
        self._releases.append(("acl.finalize", acl.finalize))
        self._check("acl.rt.set_device", acl.rt.set_device(self.device_id))
        self._releases.append(("acl.rt.reset_device", lambda: acl.rt.reset_device(self.device_id)))
        self.context = self._value("acl.rt.create_context", acl.rt.create_context(self.device_id))
        self._handle("acl.rt.create_context", self.context, acl.rt.destroy_context, "acl.rt.destroy_context")
        for key, path in files.items():
            model_id = self._value(f"acl.mdl.load_from_file({path})", mdl.load_from_file(path))
            self._releases.append(("acl.mdl.unload", lambda m=model_id: mdl.unload(m)))
            desc = self._handle("acl.mdl.create_desc", mdl.create_desc(), mdl.destroy_desc, "acl.mdl.destroy_desc")
            self._check("acl.mdl.get_desc", mdl.get_desc(desc, model_id))
            inputs, outputs = range(mdl.get_num_inputs(desc)), range(mdl.get_num_outputs(desc))
            self.models[key] = _Model(model_id, [mdl.get_input_name_by_index(desc, i) for i in inputs],
                                      [mdl.get_input_size_by_index(desc, i) for i in inputs],
                                      [mdl.get_input_data_type(desc, i) for i in inputs],
                                      [mdl.get_output_size_by_index(desc, i) for i in outputs],
                                      mdl.get_output_data_type(desc, 0))
        cache_sizes = self._cache_sizes()
        cache = [[self._malloc(size) for size in cache_sizes] for _ in range(2)]
        for key, model in self.models.items():
            self._bind(key, model, cache)

    def _cache_sizes(self) -> list[int]:
        """The presents' sizes, the same in every model and those of the decode step's ``past_*`` inputs."""
        decode = self.models.get("decode")
        decode_names = decode.names if decode else []
        first = next(iter(self.models.values()))
        sizes = first.output_sizes[1:]
        for key, model in self.models.items():
            try:
                check_output_count(key, len(model.output_sizes), decode_names)
            except ValueError as exc:
                raise EngineError(str(exc)) from None
            past = [s for n, s in zip(model.names, model.input_sizes, strict=True) if n.startswith("past_")]
            if model.output_sizes[1:] != sizes or past not in ([], sizes):
                raise EngineError(f"graph {key}'s cache buffers ({model.output_sizes[1:]} bytes out, {past} in) differ "
                                  f"from {sizes}: re-convert the bundle")
        return sizes

    def _bind(self, key: str, model: _Model, cache: list[list[int]]) -> None:
        """Buffers for the request's inputs and the logits, and the datasets of each cache set read or written."""
        slots = []
        for name, size, kind in zip(model.names, model.input_sizes, model.input_types, strict=True):
            if name.startswith("past_"):
                slots.append(None)  # bound to a cache set below, by position
                continue
            model.inputs.append((name, self._malloc(size), size, _dtype(kind, f"input {name}", key)))
            slots.append(model.inputs[-1][1:3])
        _dtype(model.logits_type, "output 0 (logits)", key)
        model.logits = self._malloc(model.output_sizes[0])
        presents = model.output_sizes[1:]
        for ptrs in cache if model.takes_cache else cache[:1]:
            past = iter(zip(ptrs, presents, strict=True))
            model.reads.append(self._dataset([slot or next(past) for slot in slots]))
        for ptrs in cache:
            model.writes.append(self._dataset([(model.logits, model.output_sizes[0]), *zip(ptrs, presents, strict=True)]))

    def reset(self) -> None:
        self.current = None

    def run(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Copy the request's inputs in, execute on the cache the last run wrote, copy the logits [1, vocab] out."""
        acl, model = self.acl, self.models[graph]
        self._check("acl.rt.set_context", acl.rt.set_context(self.context))
        copied = 0
        for name, ptr, size, dtype in model.inputs:
            data = np.ascontiguousarray(inputs[name], dtype=dtype).tobytes()
            if len(data) != size:
                raise EngineError(f"input {name} of graph {graph} has {len(data)} bytes where its model takes {size}")
            self._check("acl.rt.memcpy", acl.rt.memcpy(ptr, size, acl.util.bytes_to_ptr(data), size, HOST_TO_DEVICE))
            copied += size
        source, self.current = self.current, None  # unknown until the execute succeeds
        if model.takes_cache and source is None:
            raise EngineError(f"graph {graph} takes the KV cache and none is kept (run a prefill graph first)")
        target = 0 if source is None else 1 - source
        self._check("acl.mdl.execute", acl.mdl.execute(model.model_id, model.reads[source if model.takes_cache else 0],
                                                       model.writes[target]))
        self.current = target
        size = model.output_sizes[0]
        logits = bytes(size)  # written through its pointer, as pyACL's bytes_to_ptr examples do
        self._check("acl.rt.memcpy", acl.rt.memcpy(acl.util.bytes_to_ptr(logits), size, model.logits, size,
                                                    DEVICE_TO_HOST))
        self.host_bytes_last_run = copied + size
        return np.frombuffer(logits, dtype=DTYPES[model.logits_type]).reshape(1, -1).copy()

    def close(self) -> None:
        """Release everything acquired, newest first, even after a failure; then name the releases that failed."""
        failed = []
        if self.context:
            ret = self.acl.rt.set_context(self.context)
            failed += [f"acl.rt.set_context returned {ret}"] if ret else []
        while self._releases:
            call, release = self._releases.pop()
            ret = release()
            failed += [f"{call} returned {ret}"] if ret else []
        self.context = None
        if failed:
            raise EngineError("pyACL did not release everything: " + "; ".join(failed))


def open_on_acl(bundle: Bundle, options: EngineOptions) -> StaticEngine:
    """A static bundle's offline models (``convert.sh atc`` made and recorded them) on NPU ``options.device_id``
    through pyACL (``EngineKind.open`` lets this engine open on the ascend device only)."""
    graphs = bundle.manifest["graphs"]
    files = {key: om_file(rel) for key, rel in graphs["device"].items()}
    missing = [rel for rel in files.values() if rel not in graphs.get("om", [])]
    if missing:
        raise EngineError(f"{bundle.path} holds no {', '.join(missing)}: convert it on the board first "
                          "(./convert.sh atc, with CANN's set_env.sh sourced)")
    runner = AclGraphRunner({key: str(bundle.path / rel) for key, rel in files.items()}, options.device_id)
    return static_engine(bundle, "acl", runner)
