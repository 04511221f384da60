"""The graphs' inputs are named for what they are (bundle format 3), and bundles of the previous format are refused
with the re-export advice, except the built-in demo, which is re-exported by itself."""

from __future__ import annotations

import json

import onnx
import pytest

from appliance.bundle import FORMAT_VERSION, MANIFEST, Bundle, write_manifest
from appliance.conversion import static_input_shapes
from appliance.errors import BundleError
from appliance.loading import DEMO_QUANT, demo_bundle
from model_export.export import export_bundle
from streamchat.cli import main
from tests.conftest import TINY

TYPES = onnx.TensorProto


def _inputs(path) -> dict[str, tuple[int, list]]:
    """name -> (element type, shape with symbolic sizes as names) of a graph's inputs, in order."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: (i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in graph.input}


def _readers(graph: onnx.GraphProto, name: str) -> list[str]:
    """The op types of every node, in subgraphs too, that reads ``name``."""
    found = []
    for node in graph.node:
        found += [node.op_type] if name in node.input else []
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                found += _readers(sub, name)
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("contracts")
    return {target: export_bundle(TINY, root / target, target=target, quant="fp32").bundle
            for target in ("cpu", "ascend-310b")}


def test_cpu_graph_takes_a_prefix_mask_and_a_total_length(exported):
    graph = exported["cpu"] / "decoder.onnx"
    inputs = _inputs(graph)
    assert list(inputs)[:5] == ["input_ids", "position_ids", "prefix_mask", "total_length", "cache_capacity"]
    assert inputs["prefix_mask"] == (TYPES.BOOL, ["batch", 1, "seq", "seq"])
    assert inputs["total_length"] == (TYPES.INT32, ["batch"])
    model = onnx.load(str(graph), load_external_data=False).graph
    assert set(_readers(model, "prefix_mask")) == {"Slice"}  # the prompt's masked scores, nothing else
    assert sorted(_readers(model, "total_length")) == ["ReduceMax", "Sub"]  # GroupQueryAttention's two lengths


def test_static_graphs_take_an_attention_bias(exported):
    bundle = Bundle.open(exported["ascend-310b"])
    graphs, cfg = bundle.manifest["graphs"], bundle.config
    for key, rel in graphs["check"].items():
        gear = int(key.split(":")[1]) if ":" in key else None
        inputs = _inputs(bundle.path / rel)
        assert {name: shape for name, (_, shape) in inputs.items()} == \
            static_input_shapes(cfg, graphs["capacity"], gear, "batch")
        keys = gear or graphs["capacity"]
        assert inputs["attention_bias"] == (TYPES.FLOAT, ["batch", 1, gear or 1, keys])
        assert "attention_mask" not in inputs


def _as_previous_format(bundle) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    manifest["format_version"] = FORMAT_VERSION - 1
    write_manifest(bundle, manifest)  # sealed: only the version differs


def test_a_bundle_of_the_previous_format_is_refused_with_advice(exported, tmp_path, capsys):
    import shutil

    bundle = shutil.copytree(exported["cpu"], tmp_path / "old")
    _as_previous_format(bundle)
    assert main(["verify", str(bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bundle} has bundle format version {FORMAT_VERSION - 1}; this StreamChat reads version "
                   f"{FORMAT_VERSION}: re-export the bundle with this version"]


def test_the_demo_of_the_previous_format_is_re_exported(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    path = demo_bundle(data, export_bundle)
    assert path == data / "bundles" / f"streamchat-demo-{DEMO_QUANT}"
    _as_previous_format(path)
    with pytest.raises(BundleError, match=f"format version {FORMAT_VERSION - 1}"):
        demo_bundle(data, None)  # a front end without the export stage says how to prepare it
    heard = []
    assert demo_bundle(data, export_bundle, heard.append) == path
    assert heard == ["preparing the built-in demo model (first run after installing or upgrading)..."]
    opened = Bundle.open(path, full_check=True)
    assert opened.is_demo and opened.manifest["format_version"] == FORMAT_VERSION
    assert "prefix_mask" in _inputs(path / opened.manifest["graphs"]["decoder"])
