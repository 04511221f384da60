"""Holes a second review found in the bundle and package checks: weight data named outside the bundle by a graph, a
"verified" marker a copy could inherit, executable files in packages, ``--out`` over something that is not a file,
and errors that came with onnxruntime's own log lines or too late."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import numpy as np
import onnx
import pytest
from onnx import helper

from appliance.bundle import Bundle, sha256_file, write_manifest
from appliance.bundle_package import install, pack, pack_deb
from appliance.errors import BundleError, EngineError
from appliance.history import HistoryError, write_export
from model_export.export import export_bundle
from streamchat.cli import main
from tests.conftest import TINY

NAME = "tiny-int8"
GENERATE = ["--prompt", "hi", "--greedy", "--max-new-tokens", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One cpu bundle and one Ascend bundle (fp16 device graphs, fp32 check graphs), exported once; tests change copies."""
    root = tmp_path_factory.mktemp("review")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMCHAT_CACHE_DIR", str(root / "cache"))
        cpu = export_bundle(TINY, root / NAME, quant="int8").bundle
        ascend = export_bundle(TINY, root / "ascend", target="ascend-310b", quant="fp16").bundle
    return {"cpu": cpu, "ascend": ascend}


@pytest.fixture(autouse=True)
def _dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("STREAMCHAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "data"))


def copy_of(built, kind, tmp_path, name=None):
    return shutil.copytree(built[kind], tmp_path / (name or kind), symlinks=True)


def reseal(bundle, edit=lambda manifest: None):
    """What the author of a hostile bundle does after changing files: list every file's size and sha256 again, and seal
    the manifest with its digest."""
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    edit(manifest)
    for entry in manifest["files"]:
        entry["bytes"] = (bundle / entry["path"]).stat().st_size
        entry["sha256"] = sha256_file(bundle / entry["path"])
    write_manifest(bundle, manifest)


def one_line_error(argv, capsys, fragment):
    """The command refuses with exit 2 and exactly one line naming the problem."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    return err


def flip_byte_keeping_mtime(file, position=100):
    st = file.stat()
    with file.open("r+b") as fh:
        fh.seek(position)
        byte = fh.read(1)
        fh.seek(position)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))  # what `touch -r` does
    assert file.stat().st_mtime_ns == st.st_mtime_ns


# item 1: every external-data location of every graph is a listed file of the bundle


def external(name, location, dims=(4,), **entries):
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=list(dims))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": location, **entries}.items():
        tensor.external_data.add(key=key, value=str(value))
    return tensor


def relocate_all(model, location):
    """Point every externally stored initializer of the main graph at ``location`` (what the reviewer's mkext.py did)."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            next(e for e in tensor.external_data if e.key == "location").value = location


def in_if_branch(model, location):
    branch = next(a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    branch.initializer.append(external("hidden_weight", location))


def in_constant_of_a_branch(model, location):
    branch = next(a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    branch.node.append(helper.make_node("Constant", [], ["hidden_constant"], value=external("c", location)))


def edit_graph(bundle, rel, change, location):
    graph = bundle / rel
    model = onnx.load(str(graph), load_external_data=False)
    change(model, location)
    onnx.save(model, str(graph))
    reseal(bundle)


@pytest.fixture
def outside(built, tmp_path):
    """A copy of the weights outside any bundle: what a hostile graph would make the runtime read."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return shutil.copy(built["cpu"] / "decoder.onnx.data", folder / "w.data")


@pytest.mark.parametrize("change", [relocate_all, in_if_branch, in_constant_of_a_branch])
@pytest.mark.parametrize("where", ["absolute", "parent", "unlisted"])
def test_graph_data_outside_the_bundle_is_refused(built, tmp_path, capsys, outside, change, where):
    bundle = copy_of(built, "cpu", tmp_path)
    location = {"absolute": str(outside), "parent": "../outside/w.data", "unlisted": "w.data"}[where]
    edit_graph(bundle, "decoder.onnx", change, location)
    err = one_line_error(["verify", str(bundle)], capsys, f"decoder.onnx keeps tensor data in {location!r}")
    assert "re-export the bundle" in err
    one_line_error(["generate", "--bundle", str(bundle), *GENERATE], capsys, "not a file its manifest lists")
    assert outside.read_bytes() == (built["cpu"] / "decoder.onnx.data").read_bytes()


@pytest.mark.parametrize("kind", ["device", "check"])
def test_ascend_graph_data_outside_the_bundle_is_refused(built, tmp_path, capsys, outside, kind):
    bundle = copy_of(built, "ascend", tmp_path)
    rel = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["graphs"][kind]["decode"]
    assert (kind == "check") == rel.endswith(".fp32.onnx")  # the fixture has both kinds of graph
    edit_graph(bundle, rel, relocate_all, str(outside))
    one_line_error(["verify", str(bundle)], capsys, f"{rel} keeps tensor data in {str(outside)!r}")


def test_graph_data_beyond_its_file_is_refused(built, tmp_path, capsys):
    bundle = copy_of(built, "cpu", tmp_path)
    size = (bundle / "decoder.onnx.data").stat().st_size

    def beyond(model, location):
        model.graph.initializer.append(external("late", location, offset=size - 8, length=16))

    edit_graph(bundle, "decoder.onnx", beyond, "decoder.onnx.data")
    one_line_error(["verify", str(bundle)], capsys, f"bytes {size - 8}..{size + 8} of decoder.onnx.data ({size} bytes)")


def test_graph_data_with_two_locations_is_refused(built, tmp_path, capsys):
    bundle = copy_of(built, "cpu", tmp_path)

    def twice(model, location):  # a reader that takes the first location reads outside, one that takes the last not
        tensor = external("twice", location)
        tensor.external_data.add(key="location", value="decoder.onnx.data")
        model.graph.initializer.append(tensor)

    edit_graph(bundle, "decoder.onnx", twice, "/etc/hostname")
    one_line_error(["verify", str(bundle)], capsys, "decoder.onnx gives a tensor's external data a field twice")


def test_graph_that_is_not_onnx_is_one_line(built, tmp_path, capsys):
    bundle = copy_of(built, "cpu", tmp_path)
    (bundle / "decoder.onnx").write_bytes(b"\xff" * 64)
    reseal(bundle)
    one_line_error(["verify", str(bundle)], capsys, "decoder.onnx is not an ONNX graph")


def test_the_bundle_reader_does_not_need_onnx_at_import():
    code = "import sys, appliance.bundle, appliance.bundle_package; sys.exit('onnx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=TINY.parents[2]).returncode == 0


# item 2: "already verified" only for the very same files


def test_copy_with_flipped_bytes_and_restored_times_is_hashed_again(built, tmp_path, capsys):
    first = copy_of(built, "cpu", tmp_path)
    Bundle.open(first)  # verified and remembered
    second = shutil.copytree(first, tmp_path / "copy")  # like `cp -a`: same manifest, sizes and mtimes
    flip_byte_keeping_mtime(second / "decoder.onnx.data")
    one_line_error(["generate", "--bundle", str(second), *GENERATE], capsys, "checksum mismatch in decoder.onnx.data")


def test_bytes_flipped_in_place_with_restored_mtime_are_found(built, tmp_path):
    bundle = copy_of(built, "cpu", tmp_path)
    Bundle.open(bundle)
    flip_byte_keeping_mtime(bundle / "decoder.onnx.data")  # the ctime still moves
    with pytest.raises(BundleError, match="checksum mismatch in decoder.onnx.data"):
        Bundle.open(bundle)


def count_hashing(monkeypatch):
    calls = []
    original = Bundle.check_checksums
    monkeypatch.setattr(Bundle, "check_checksums", lambda self, *a: calls.append(self.path) or original(self, *a))
    return calls


def test_unchanged_bundle_and_fresh_install_are_not_hashed_again(built, tmp_path, monkeypatch):
    calls = count_hashing(monkeypatch)
    bundle = copy_of(built, "cpu", tmp_path)
    Bundle.open(bundle)
    Bundle.open(bundle)
    assert calls == [bundle]
    link = install(pack(bundle, tmp_path / "p.tar"), tmp_path / "models")  # pack and install hash it in full
    calls.clear()
    Bundle.open(link)  # install verified the very folder the link points at
    assert calls == []


# item 3: only an Ascend bundle's own convert.sh is ever executable


@pytest.mark.parametrize("rel", ["convert.sh", "converter/decode.ini"])
def test_cpu_bundle_listing_conversion_files_is_refused(built, tmp_path, capsys, rel):
    bundle = copy_of(built, "cpu", tmp_path)
    (bundle / rel).parent.mkdir(exist_ok=True)
    (bundle / rel).write_text("#!/bin/sh\ntouch /tmp/pwned\n")
    (bundle / rel).chmod(0o755)
    reseal(bundle, lambda m: m["files"].append({"path": rel}))
    one_line_error(["verify", str(bundle)], capsys, f"{rel}: only Ascend bundles carry convert.sh and converter/")
    with pytest.raises(BundleError, match="only Ascend bundles carry"):
        install(package_of(bundle, tmp_path / "p.tar"), tmp_path / "models")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def package_of(bundle, out, mode=None):
    """A tar of ``bundle`` as `pack` lays it out, every member with mode ``mode`` if given."""
    with tarfile.open(out, "w") as archive:
        for path in sorted(bundle.rglob("*")):
            info = archive.gettarinfo(path, arcname=f"{NAME}/{path.relative_to(bundle).as_posix()}")
            info.mode = mode if mode is not None else info.mode
            archive.addfile(info, path.open("rb") if path.is_file() else None)
    return out


def modes(folder):
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) & 0o111
            for p in folder.rglob("*") if p.is_file()}


def test_install_writes_no_execute_bits(built, tmp_path):
    link = install(package_of(built["cpu"], tmp_path / "p.tar", mode=0o755), tmp_path / "models")
    assert modes(link) == dict.fromkeys(modes(built["cpu"]), 0)


def test_installed_ascend_bundle_runs_only_its_own_convert_script(built, tmp_path):
    source = copy_of(built, "ascend", tmp_path, name=NAME)
    link = install(package_of(source, tmp_path / "a.tar", mode=0o755), tmp_path / "models")
    assert {rel for rel, bits in modes(link).items() if bits} == {"convert.sh"}
    assert os.access(link / "convert.sh", os.X_OK)


# item 4: --out replaces only a regular file (or nothing); a package must be a regular file


@pytest.fixture
def not_files(tmp_path):
    """What an --out may be that is not a regular file: a FIFO, a folder, links to both and a link to a file."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("keep me")
    for target in ("fifo", "folder", "file.txt"):
        (tmp_path / f"link-to-{target}").symlink_to(tmp_path / target)
    return ["fifo", "folder", "link-to-fifo", "link-to-folder", "link-to-file.txt"]


def unchanged(tmp_path):
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode) and (tmp_path / "folder").is_dir()
    assert (tmp_path / "file.txt").read_text() == "keep me"
    assert all((tmp_path / f"link-to-{t}").is_symlink() for t in ("fifo", "folder", "file.txt"))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_history_export_out_must_be_a_regular_file(tmp_path, capsys, not_files):
    for name in not_files:
        one_line_error(["history", "export", "--out", str(tmp_path / name)], capsys, "is not a regular file")
        with pytest.raises(HistoryError, match="is not a regular file"):
            write_export(tmp_path / name, "text")
    unchanged(tmp_path)
    write_export(tmp_path / "file.txt", "replaced")  # a regular file is replaced whole
    assert (tmp_path / "file.txt").read_text() == "replaced"


def test_pack_out_must_be_a_regular_file(built, tmp_path, capsys, not_files):
    for name in not_files:
        one_line_error(["bundle", "pack", str(built["cpu"]), "--out", str(tmp_path / name)], capsys,
                       "is not a regular file")
        with pytest.raises(BundleError, match="is not a regular file"):
            pack_deb(built["cpu"], tmp_path / name)  # refused before dpkg-deb is needed
    unchanged(tmp_path)
    assert pack(built["cpu"], tmp_path / "file.txt") == tmp_path / "file.txt"
    assert tarfile.is_tarfile(tmp_path / "file.txt")
    for out in (tmp_path / "missing" / "p.tar", tmp_path / "missing" / "p.deb"):
        with pytest.raises(BundleError, match=f"the folder {tmp_path / 'missing'} does not exist"):
            (pack_deb if out.suffix == ".deb" else pack)(built["cpu"], out)


def test_install_of_a_fifo_or_folder_is_refused_without_waiting(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    for name in ("fifo", "folder"):
        run = subprocess.run([sys.executable, "-m", "streamchat.cli", "bundle", "install", str(tmp_path / name),
                              "--into", str(tmp_path / "models")], capture_output=True, text=True, timeout=60,
                             cwd=TINY.parents[2])
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        assert f"{tmp_path / name} is not a regular file" in run.stderr
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode) and not (tmp_path / "models").exists()


# item 5: num_image_tokens against the vocabulary; onnxruntime's own log lines stay quiet


def test_num_image_tokens_beyond_the_vocabulary_is_refused_by_the_validator(built, tmp_path, capsys):
    bundle = copy_of(built, "cpu", tmp_path)
    reseal(bundle, lambda m: m["tokenizer"].update(num_image_tokens=1_000_000))
    one_line_error(["verify", str(bundle)], capsys, "tokenizer.num_image_tokens must be a whole number from 0 to 21068")


def test_tokenizer_ids_beyond_the_vocabulary_are_refused(built, tmp_path, capsys):
    bundle = copy_of(built, "cpu", tmp_path)
    reseal(bundle, lambda m: m["tokenizer"].update(num_image_tokens=20_500))  # 1069 pieces + 20500 > 21069 rows
    one_line_error(["generate", "--bundle", str(bundle), *GENERATE], capsys,
                   "its tokenizer has 21569 ids but the model has 21069 embedding rows")


def test_a_failing_step_prints_no_onnxruntime_log(built, capfd):
    sequence = Bundle.open(built["cpu"]).engine(threads=1).start()
    capfd.readouterr()
    with pytest.raises(EngineError, match="onnxruntime failed during a step"):
        sequence.prefill(np.array([1_000_000]), np.zeros((2, 1), np.int64), np.zeros((1, 1), bool))
    assert capfd.readouterr().err == ""


def test_a_failing_static_graph_prints_no_onnxruntime_log(built, capfd):
    from appliance.engines.static import OrtGraphRunner

    manifest = json.loads((built["ascend"] / "manifest.json").read_text(encoding="utf-8"))
    runner = OrtGraphRunner({"decode": str(built["ascend"] / manifest["graphs"]["check"]["decode"])}, threads=1)
    feed = {}
    for item in runner.sessions["decode"].get_inputs():
        if not item.name.startswith("past_"):
            dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                     "tensor(bool)": bool}[item.type]
            feed[item.name] = np.full([d if isinstance(d, int) else 1 for d in item.shape], 1_000_000).astype(dtype)
    runner.cache = [np.zeros([d if isinstance(d, int) else 1 for d in o.shape], np.float32)
                    for o in runner.sessions["decode"].get_outputs() if o.name.startswith("present_")]
    capfd.readouterr()
    with pytest.raises(Exception):  # noqa: B017 - any onnxruntime failure: what matters is what it printed
        runner.run("decode", feed)
    assert capfd.readouterr().err == ""


def test_exported_bundles_still_verify(built, capsys):
    for kind in ("cpu", "ascend"):
        assert main(["verify", str(built[kind])]) == 0, capsys.readouterr().err
