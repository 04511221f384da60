"""The step server's load on a Lite with ``ModelGroup`` (r2.2 and later; Lite 2.0.0 here has none), on an NPU.

What can be checked without that Lite is the call order its documentation prescribes for weight sharing
(mindspore_lite.ModelGroup, r2.2: ``ModelGroup(ModelGroupFlag.SHARE_WEIGHT)``, ``add_model`` of the Model objects
*before* each ``build_from_file``, ``provider=ge`` from the runtime config), so a recording stand-in for the
``mindspore_lite`` module takes the calls; whether sharing works on an NPU is not checked here (docs/ascend.md).
"""

from __future__ import annotations

import sys
import types

from appliance.engines import lite_server

calls: list[tuple] = []


class _Model:
    def __init__(self) -> None:
        self.id = len([c for c in calls if c[0] == "Model"])
        calls.append(("Model", self.id))

    def build_from_file(self, path, model_type, context, config_path) -> None:
        calls.append(("build", self.id, path, config_path))

    def get_inputs(self) -> list:
        return []


class _Group:
    def __init__(self, flag) -> None:
        calls.append(("ModelGroup", flag))

    def add_model(self, models) -> None:
        calls.append(("add_model", [m.id for m in models]))


def _lite(with_group: bool) -> types.ModuleType:
    module = types.ModuleType("mindspore_lite")
    module.Model = _Model
    module.ModelType = types.SimpleNamespace(MINDIR="MINDIR")
    module.Context = lambda: types.SimpleNamespace(target=None, ascend=types.SimpleNamespace(), cpu=types.SimpleNamespace())
    if with_group:
        module.ModelGroup = _Group
        module.ModelGroupFlag = types.SimpleNamespace(SHARE_WEIGHT="SHARE_WEIGHT")
    return module


def _load(tmp_path, monkeypatch, with_group: bool, device: str) -> lite_server.Server:
    calls.clear()
    monkeypatch.setitem(sys.modules, "mindspore_lite", _lite(with_group))
    graphs = {}
    for name in ("prefill:64", "decode"):
        mindir = tmp_path / f"{name.replace(':', '_')}.mindir"
        mindir.write_bytes(b"converted by convert.sh")
        graphs[name] = {"onnx": "unused.onnx", "config": "", "shape": "input_ids:1,1", "mindir": str(mindir)}
    server = lite_server.Server()
    server.load({"graphs": graphs, "runtime_config": "[ascend_context]\nprovider=ge\n", "optimize": "ascend_oriented",
                 "cache_dir": str(tmp_path / "cache"), "device": device, "device_id": 1, "threads": 0},
                lambda stage, graph: None)
    return server


def test_on_an_npu_every_model_joins_one_weight_sharing_group_before_it_is_built(tmp_path, monkeypatch):
    server = _load(tmp_path, monkeypatch, with_group=True, device="ascend")
    runtime = str(tmp_path / "cache" / "runtime.ini")
    assert calls == [("Model", 0), ("Model", 1), ("ModelGroup", "SHARE_WEIGHT"), ("add_model", [0, 1]),
                     ("build", 0, str(tmp_path / "prefill_64.mindir"), runtime),
                     ("build", 1, str(tmp_path / "decode.mindir"), runtime)]
    assert isinstance(server.group, _Group)  # kept alive with the models
    assert (tmp_path / "cache" / "runtime.ini").read_text() == "[ascend_context]\nprovider=ge\n"


def test_without_model_group_or_on_the_cpu_each_model_is_built_alone(tmp_path, monkeypatch):
    for with_group, device in ((False, "ascend"), (True, "cpu")):
        _load(tmp_path, monkeypatch, with_group=with_group, device=device)
        assert [c[0] for c in calls] == ["Model", "Model", "build", "build"]
