"""Hostile bundles and packages: a manifest covered by its own digest, paths that stay inside the bundle, no unlisted
files, conversion files that are exactly what the export writes, and installs that touch nothing outside ``--into``."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from appliance.bundle import Bundle
from appliance.bundle_package import install, pack
from appliance.errors import BundleError
from model_export.export import export_bundle
from streamchat.cli import main
from tests.conftest import TINY

NAME = "tiny-int8"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One cpu bundle, its package and one Ascend bundle, exported once; tests mutate copies."""
    root = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STREAMCHAT_CACHE_DIR", str(root / "cache"))
        cpu = export_bundle(TINY, root / NAME, quant="int8").bundle
        ascend = export_bundle(TINY, root / "ascend", target="ascend-310b", quant="fp32").bundle
        package = pack(cpu, root / f"{NAME}.tar")
    return {"cpu": cpu, "ascend": ascend, "package": package}


@pytest.fixture(autouse=True)
def _dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMCHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("STREAMCHAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "data"))


def copy_of(built, kind, tmp_path):
    return shutil.copytree(built[kind], tmp_path / kind, symlinks=True)


def load(bundle):
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


def resign(bundle, manifest):
    """What an attacker who controls a whole bundle does: hash every listed file, then the manifest itself."""
    for entry in manifest["files"] if isinstance(manifest.get("files"), list) else []:
        file = bundle / entry["path"]
        new = set(entry) == {"path"}  # an entry the attacker added; others keep the fields a test may have removed
        if file.is_file() and (new or "bytes" in entry):
            entry["bytes"] = file.stat().st_size
        if file.is_file() and (new or "sha256" in entry):
            entry["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    raw = json.dumps(manifest, indent=1).encode()
    (bundle / "manifest.json").write_bytes(raw)
    (bundle / "manifest.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n")


def verify_fails(bundle, capsys, fragment):
    """``streamchat verify`` refuses with exit 2 and one line naming the problem."""
    assert main(["verify", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    return err


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# item 1: install never removes anything outside --into


@pytest.mark.parametrize("absolute", [True, False])
def test_install_over_a_user_link_leaves_its_target_alone(built, tmp_path, absolute):
    outside = copy_of(built, "cpu", tmp_path / "elsewhere")
    before = tree(outside)
    into = tmp_path / "models"
    into.mkdir()
    (into / NAME).symlink_to(outside if absolute else os.path.relpath(outside, into))
    link = install(built["package"], into)
    assert tree(outside) == before
    assert link.is_symlink() and os.readlink(link).startswith(f".{NAME}.")
    assert Bundle.open(link, full_check=True).manifest == Bundle.open(built["cpu"]).manifest


def test_install_refuses_a_plain_folder_at_the_name(built, tmp_path, capsys):
    into = tmp_path / "models"
    mine = copy_of(built, "cpu", into)
    mine.rename(into / NAME)
    (into / NAME / "notes.txt").write_text("mine")
    before = tree(into / NAME)
    assert main(["bundle", "install", str(built["package"]), "--into", str(into)]) == 2
    assert "is not a bundle installed by `streamchat bundle install`" in capsys.readouterr().err
    assert tree(into / NAME) == before and sorted(p.name for p in into.iterdir()) == [NAME]


# item 2: convert.sh runs no manifest value and refuses an edited manifest


FAKE_CONVERTER = """#!/usr/bin/env bash
set -eu
for arg in "$@"; do
  case "$arg" in --outputFile=*) out=${arg#--outputFile=} ;; --configFile=*) cfg=${arg#--configFile=} ;;
                 --inputShape=*) shape=${arg#--inputShape=} ;; esac
done
grep -q '^precision_mode=enforce_origin$' "$cfg"
case "$shape" in input_ids:1,*) ;; *) exit 3 ;; esac
printf 'mindir %s' "$(basename "$out")" > "$out.mindir"
"""
FAKE_ATC = """#!/usr/bin/env bash
set -eu
for arg in "$@"; do
  case "$arg" in --output=*) out=${arg#--output=} ;; --soc_version=*) soc=${arg#--soc_version=} ;; esac
done
[ "$soc" = Ascend310B4 ]
printf 'om %s' "$(basename "$out")" > "$out.om"
"""


def run_convert(bundle, tmp_path, soc=None, route=(), converter=FAKE_CONVERTER):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("converter_lite", converter), ("atc", FAKE_ATC),
                       ("npu-smi", "#!/usr/bin/env bash\necho '| 0  310B4  | OK |'\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("SOC_VERSION", None)
    if soc is not None:
        env["SOC_VERSION"] = soc
    return subprocess.run(["bash", str(bundle / "convert.sh"), *route], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_convert_runs_no_manifest_value_and_records_its_files(built, tmp_path, capsys):
    bundle = copy_of(built, "ascend", tmp_path)
    marker = tmp_path / "ran"
    manifest = load(bundle)
    hostile = f"x/;e touch {marker};#"
    manifest["graphs"]["input_shapes"] = {name: hostile for name in ("prefill_64", "prefill_256", "decode")}
    manifest["name"] = f"$(touch {marker})"
    resign(bundle, manifest)
    proc = run_convert(bundle, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists()
    assert "recorded 3 MindIR and 0 OM files" in proc.stdout
    recorded = load(bundle)
    assert recorded["graphs"]["mindir"] == ["mindir/decode.mindir", "mindir/prefill_256.mindir", "mindir/prefill_64.mindir"]
    assert (bundle / "mindir" / "decode.mindir").read_text() == "mindir decode"
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(".convert")]
    assert main(["verify", str(bundle)]) == 0, capsys.readouterr().err
    assert "checksums match" in capsys.readouterr().out


def test_convert_with_atc_records_om_files(built, tmp_path, capsys):
    bundle = copy_of(built, "ascend", tmp_path)
    proc = run_convert(bundle, tmp_path, route=["atc"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ATC for Ascend310B4" in proc.stdout and "recorded 0 MindIR and 3 OM files" in proc.stdout
    assert load(bundle)["graphs"]["om"] == ["om/decode.om", "om/prefill_256.om", "om/prefill_64.om"]
    assert main(["verify", str(bundle)]) == 0, capsys.readouterr().err


def test_a_failed_conversion_keeps_what_was_recorded(built, tmp_path, capsys):
    """A converter that fails on a later graph leaves the bundle as it was: no partial mindir/, nothing recorded."""
    bundle = copy_of(built, "ascend", tmp_path)
    before = load(bundle)
    failing = FAKE_CONVERTER.replace("set -eu", 'set -eu\ncase "$*" in *prefill_64*) exit 7 ;; esac')
    proc = run_convert(bundle, tmp_path, converter=failing)
    assert proc.returncode == 7 and "convert.sh: prefill_256.onnx" in proc.stdout
    assert load(bundle) == before
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in built["ascend"].iterdir())
    assert main(["verify", str(bundle)]) == 0, capsys.readouterr().err


def test_convert_refuses_a_soc_version_that_is_not_a_name(built, tmp_path):
    bundle = copy_of(built, "ascend", tmp_path)
    marker = tmp_path / "ran"
    proc = run_convert(bundle, tmp_path, soc=f"x/;e touch {marker};#", route=["atc"])
    assert proc.returncode == 2 and "SOC_VERSION must look like Ascend310B1" in proc.stdout
    assert not marker.exists() and not (bundle / "om").exists()


def test_edited_manifest_fails_verify_and_convert(built, tmp_path, capsys):
    bundle = copy_of(built, "ascend", tmp_path)
    text = (bundle / "manifest.json").read_text(encoding="utf-8")
    (bundle / "manifest.json").write_text(text.replace('"name": "ChatGLM-6B"', '"name": "ChatGLM-6X"'), encoding="utf-8")
    verify_fails(bundle, capsys, "does not match manifest.sha256")
    proc = run_convert(bundle, tmp_path)
    assert proc.returncode != 0 and "does not match manifest.sha256" in proc.stderr
    assert not list((bundle / "mindir").glob("*.mindir"))


@pytest.mark.parametrize("rel, edit", [
    ("convert.sh", lambda text: text.replace("set -euo pipefail", "set -euo pipefail\ntouch /tmp/owned")),
    ("converter/decode.ini", lambda text: text + "\n[registry]\nplugin_path=./evil.so\n"),
])
def test_conversion_files_must_be_the_exported_ones(built, tmp_path, capsys, rel, edit):
    """A package can carry any script, checksummed by its own manifest: only the exact files the export writes pass."""
    bundle = copy_of(built, "ascend", tmp_path)
    (bundle / rel).write_text(edit((bundle / rel).read_text()))
    resign(bundle, load(bundle))
    verify_fails(bundle, capsys, f"{rel} is not the")


def test_extra_converter_config_is_refused(built, tmp_path, capsys):
    bundle = copy_of(built, "ascend", tmp_path)
    shutil.copyfile(bundle / "converter" / "decode.ini", bundle / "converter" / "evil.ini")
    manifest = load(bundle)
    manifest["files"].append({"path": "converter/evil.ini"})
    resign(bundle, manifest)
    verify_fails(bundle, capsys, "conversion files")


# item 6: every path a manifest names stays inside the bundle and is checksummed; no unlisted files


@pytest.mark.parametrize("field, value, fragment", [
    ("decoder", "/etc/passwd", "graphs.decoder must be a relative path inside the bundle"),
    ("decoder", "../elsewhere/decoder.onnx", "graphs.decoder must be a relative path inside the bundle"),
    ("decoder", "export_report.json/../decoder.onnx", "graphs.decoder must be a relative path inside the bundle"),
    ("tokenizer", "/usr/share/x.model", "tokenizer.file must be a relative path inside the bundle"),
    ("decoder", "copy.onnx", "graphs.decoder names 'copy.onnx', which is not in its files list"),
])
def test_named_paths_stay_inside_and_are_listed(built, tmp_path, capsys, field, value, fragment):
    bundle = copy_of(built, "cpu", tmp_path)
    shutil.copyfile(bundle / "decoder.onnx", bundle / "copy.onnx")
    manifest = load(bundle)
    if field == "tokenizer":
        manifest["tokenizer"]["file"] = value
    else:
        manifest["graphs"]["decoder"] = value
    resign(bundle, manifest)
    if value == "copy.onnx":
        (bundle / "copy.onnx").unlink()
    verify_fails(bundle, capsys, fragment)


def test_listed_file_through_a_symlink_leaving_the_bundle_is_refused(built, tmp_path, capsys):
    bundle = copy_of(built, "cpu", tmp_path)
    outside = tmp_path / "outside.model"
    shutil.move(bundle / "ice_text.model", outside)
    (bundle / "ice_text.model").symlink_to(outside)
    verify_fails(bundle, capsys, "ice_text.model leads outside the bundle")


def test_unlisted_file_is_refused(built, tmp_path, capsys):
    bundle = copy_of(built, "cpu", tmp_path)
    (bundle / "run_me.sh").write_text("echo hi\n")
    verify_fails(bundle, capsys, "files its manifest does not list (run_me.sh)")
    with pytest.raises(BundleError, match="does not list"):
        Bundle.open(bundle)


def test_missing_digest_says_re_export(built, tmp_path, capsys):
    bundle = copy_of(built, "cpu", tmp_path)
    (bundle / "manifest.sha256").unlink()
    verify_fails(bundle, capsys, "has no manifest.sha256")


def test_cached_demo_of_an_older_format_is_re_exported(tmp_path):
    from appliance.loading import DEMO_QUANT, demo_bundle

    first = demo_bundle(tmp_path / "data", export_bundle)
    assert first == tmp_path / "data" / "bundles" / f"streamchat-demo-{DEMO_QUANT}"
    (first / "manifest.sha256").unlink()  # as a bundle written before manifests had a digest
    assert demo_bundle(tmp_path / "data", export_bundle) == first
    assert Bundle.open(first, full_check=True).is_demo


def test_cached_demo_from_another_release_is_prepared_again(tmp_path, monkeypatch):
    """An upgrade that ships a retrained demo: the demo prepared by the earlier release is exported again."""
    from appliance import loading

    first = loading.demo_bundle(tmp_path / "data", export_bundle)
    exports = []

    def counting_export(*args, **kwargs):
        exports.append(kwargs["extra_manifest"])
        return export_bundle(*args, **kwargs)

    assert loading.demo_bundle(tmp_path / "data", counting_export) == first and exports == []  # the same release
    monkeypatch.setattr(loading, "demo_checkpoint_digest", lambda: "0" * 64)  # as if the shipped demo had changed
    with pytest.raises(BundleError, match="prepared from another release's demo model"):
        loading.demo_bundle(tmp_path / "data", None)
    assert loading.demo_bundle(tmp_path / "data", counting_export) == first
    assert exports == [{"demo": True, "demo_checkpoint": "0" * 64}]
    assert Bundle.open(first).manifest["demo_checkpoint"] == "0" * 64


# item 8: malformed manifests are one line each


def _ascend_without_check(m):
    del m["graphs"]["check"]


def _drop_bytes(m):
    del m["files"][0]["bytes"]


@pytest.mark.parametrize("kind, mutate, fragment", [
    ("cpu", lambda m: m.update(files={f["path"]: f for f in m["files"]}), "files must be a list"),
    ("cpu", _drop_bytes, "files[0].bytes must be"),
    ("cpu", lambda m: m.pop("graphs"), "graphs must be"),
    ("cpu", lambda m: m.update(quant=None), "quant.weights must be"),
    ("cpu", lambda m: m.update(max_context="lots"), "max_context must be"),
    ("cpu", lambda m: m.update(max_context=10**9), "max_context must be"),
    ("cpu", lambda m: m["model"]["config"].update(num_heads=0), "manifest.json"),
    ("cpu", lambda m: m.update(model=[]), "model.config must be"),
    ("cpu", lambda m: m.update(target="gpu"), "target must be one of"),
    ("cpu", lambda m: m.update(name="x\nPre-Depends: evil"), "name must be"),
    ("cpu", lambda m: m["tokenizer"].update(num_image_tokens="many"), "tokenizer.num_image_tokens must be"),
    ("ascend", _ascend_without_check, "graphs.check must be"),
    ("ascend", lambda m: m["graphs"].update(prefill_gears=[0]), "graphs.prefill_gears must be"),
    ("ascend", lambda m: m["graphs"]["device"].update({"decode": "prefill_64.onnx"}), "graphs.device"),
])
def test_malformed_manifest_is_one_line(built, tmp_path, capsys, kind, mutate, fragment):
    bundle = copy_of(built, kind, tmp_path)
    manifest = load(bundle)
    mutate(manifest)
    resign(bundle, manifest)
    verify_fails(bundle, capsys, fragment)


def test_manifest_that_is_not_json_or_too_deep_is_one_line(built, tmp_path, capsys):
    bundle = copy_of(built, "cpu", tmp_path)
    raw = b"[" * 200_000
    (bundle / "manifest.json").write_bytes(raw)
    (bundle / "manifest.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n")
    verify_fails(bundle, capsys, "is corrupt")


# item 6, packages: only what `pack` writes is installed


def package_of(bundle, out, name=NAME, extra=(), mode="w", sparse=False):
    with tarfile.open(out, mode) as archive:
        for path in sorted(bundle.rglob("*")):
            archive.add(path, arcname=f"{name}/{path.relative_to(bundle).as_posix()}", recursive=False)
        for arcname, data in extra:
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out


def refused(package, into, fragment):
    with pytest.raises(BundleError, match=fragment) as caught:
        install(package, into)
    assert "\n" not in str(caught.value)
    assert not into.exists() or not [p for p in into.iterdir() if "installing" in p.name]


def test_package_with_an_unlisted_file_is_refused(built, tmp_path):
    package = package_of(built["cpu"], tmp_path / "p.tar", extra=[(f"{NAME}/run_me.sh", b"echo hi\n")])
    refused(package, tmp_path / "models", "run_me.sh, which its manifest does not list")


def test_compressed_package_is_refused_before_writing(built, tmp_path):
    for mode in ("w:gz", "w:bz2", "w:xz"):
        package = package_of(built["cpu"], tmp_path / f"p.{mode[2:]}", mode=mode)
        refused(package, tmp_path / "models", "not an uncompressed tar")
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def test_sparse_member_is_refused(built, tmp_path):
    src = tmp_path / "src" / NAME
    shutil.copytree(built["cpu"], src)
    with (src / "decoder.onnx.data").open("r+b") as fh:
        fh.truncate(50 << 20)  # a hole the sparse member stores in a few bytes
    package = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--format=gnu", "-S", "-cf", str(package), "-C", str(src.parent), NAME], check=True)
    assert package.stat().st_size < 10 << 20
    refused(package, tmp_path / "models", "unsafe entry")


@pytest.mark.parametrize("arcname", [".", "./", f"{NAME}/./manifest.json"])
def test_dot_member_is_a_clean_error(built, tmp_path, arcname):
    package = package_of(built["cpu"], tmp_path / "p.tar", extra=[(arcname, b"")])
    refused(package, tmp_path / "models", "unsafe entry|one top folder")


def test_package_named_like_a_live_version_is_refused(built, tmp_path):
    into = tmp_path / "models"
    link = install(built["package"], into)
    live = os.readlink(link)
    package = package_of(built["cpu"], tmp_path / "p.tar", name=live)
    refused(package, into, "unsafe entry")
    assert os.readlink(link) == live and (into / live).is_dir() and not (into / live).is_symlink()
    assert Bundle.open(link, full_check=True)


def test_package_whose_sizes_disagree_with_its_manifest_is_refused_before_extracting(built, tmp_path):
    src = copy_of(built, "cpu", tmp_path)
    (src / "export_report.json").write_text("{}" + " " * 10_000)  # bigger than listed, manifest unchanged
    package = package_of(src, tmp_path / "p.tar")
    refused(package, tmp_path / "models", "export_report.json is 10002 bytes in the package")


def test_package_with_an_edited_manifest_is_refused(built, tmp_path):
    src = copy_of(built, "cpu", tmp_path)
    text = (src / "manifest.json").read_text(encoding="utf-8")
    (src / "manifest.json").write_text(text.replace('"name": "ChatGLM-6B"', '"name": "ChatGLM-6X"'), encoding="utf-8")
    refused(package_of(src, tmp_path / "p.tar"), tmp_path / "models", "does not match manifest.sha256")


def test_pack_of_an_installed_bundle_keeps_its_name(built, tmp_path):
    link = install(built["package"], tmp_path / "models")
    again = pack(link, tmp_path / "again.tar")
    with tarfile.open(again) as archive:
        assert {m.name.split("/")[0] for m in archive.getmembers()} == {NAME}
        assert f"{NAME}/manifest.sha256" in archive.getnames()
    assert install(again, tmp_path / "models2").name == NAME


def test_installed_ascend_bundle_keeps_a_runnable_convert_script(built, tmp_path):
    link = install(pack(built["ascend"], tmp_path / "ascend.tar"), tmp_path / "models")
    assert os.access(link / "convert.sh", os.X_OK) and not os.access(link / "manifest.json", os.X_OK)
    assert Bundle.open(link, full_check=True).target == "ascend-310b"


def test_package_with_an_entry_twice_is_refused(built, tmp_path):
    package = package_of(built["cpu"], tmp_path / "p.tar", extra=[(f"{NAME}/export_report.json", b"{}")])
    refused(package, tmp_path / "models", "holds an entry twice")


# the review of the converter files: what a bundle's own files can make convert.sh and smoke_test.py do

RECORDING_CONVERTER = FAKE_CONVERTER.replace("set -eu", 'set -eu\nfor arg in "$@"; do case "$arg" in --configFile=*) '
                                             'cat "${arg#--configFile=}" >> "$RECORD" ;; esac; done')


def test_convert_uses_its_own_converter_config(built, tmp_path, monkeypatch):
    """A converter config can name a plugin library the converter loads: convert.sh writes its own."""
    bundle = copy_of(built, "ascend", tmp_path)
    for ini in (bundle / "converter").glob("*.ini"):
        ini.write_text(ini.read_text() + "\n[registry]\nplugin_path=./.plugin.so\n")
    monkeypatch.setenv("RECORD", str(tmp_path / "configs"))
    proc = run_convert(bundle, tmp_path, converter=RECORDING_CONVERTER)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = (tmp_path / "configs").read_text()
    assert "precision_mode=enforce_origin" in seen and "registry" not in seen and "plugin_path" not in seen


def test_convert_imports_nothing_from_the_bundle(built, tmp_path):
    bundle = copy_of(built, "ascend", tmp_path)
    marker = tmp_path / "ran"
    for module in ("json", "hashlib", "tempfile"):
        (bundle / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('{module}')\n")
    proc = run_convert(bundle, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists()


def test_convert_writes_no_file_through_a_planted_link(built, tmp_path):
    bundle = copy_of(built, "ascend", tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    for name in ("manifest.json.partial", "manifest.sha256.partial"):
        (bundle / name).symlink_to(victim)
    proc = run_convert(bundle, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert victim.read_text() == "mine" and not (bundle / "manifest.json").is_symlink()


def test_convert_refuses_a_linked_output_folder(built, tmp_path):
    bundle = copy_of(built, "ascend", tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("mine")
    (bundle / "om").symlink_to(elsewhere)
    proc = run_convert(bundle, tmp_path)
    assert proc.returncode != 0 and "convert.sh: om is a symbolic link" in proc.stderr
    assert "om/precious" not in (bundle / "manifest.json").read_text()
    assert (elsewhere / "precious").read_text() == "mine"


def test_converted_models_are_readable_by_other_users(built, tmp_path):
    bundle = copy_of(built, "ascend", tmp_path)
    private = FAKE_CONVERTER.replace('printf', 'umask 077; printf').replace('> "$out.mindir"',
                                                                         '> "$out.mindir"; chmod 400 "$out.mindir"')
    proc = run_convert(bundle, tmp_path, converter=private)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert oct((bundle / "mindir").stat().st_mode & 0o777) == "0o755"
    assert {oct(p.stat().st_mode & 0o777) for p in (bundle / "mindir").iterdir()} == {"0o644"}


def test_bundle_convert_checks_the_bundle_before_running_its_own_script(built, tmp_path, capfd, monkeypatch):
    bundle = copy_of(built, "ascend", tmp_path)
    tools = tmp_path / "fakebin"
    tools.mkdir()
    (tools / "converter_lite").write_text(FAKE_CONVERTER)
    (tools / "converter_lite").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    (bundle / "convert.sh").write_text((bundle / "convert.sh").read_text().replace("set -euo", "touch owned; set -euo"))
    resign(bundle, load(bundle))
    assert main(["bundle", "convert", str(bundle)]) == 2
    assert "convert.sh is not the conversion script this StreamChat writes" in capfd.readouterr().err
    fresh = copy_of(built, "ascend", tmp_path / "fresh")
    assert main(["bundle", "convert", str(fresh)]) == 0
    assert "recorded 3 MindIR and 0 OM files" in capfd.readouterr().out
    assert load(fresh)["graphs"]["mindir"] == ["mindir/decode.mindir", "mindir/prefill_256.mindir",
                                               "mindir/prefill_64.mindir"]
    assert not (bundle / "owned").exists() and not (fresh / "owned").exists()
