"""The checkpoint reader: formats, tying, and clear refusals of broken or hostile files."""

import json
import shutil
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from appliance.errors import CheckpointError
from model_export.checkpoint import Checkpoint
from tests.conftest import TINY

META = ["config.json", "tokenizer_config.json", "ice_text.model"]


def _copy(tmp_path, files):
    for name in META + files:
        shutil.copy(TINY / name, tmp_path / name)
    return tmp_path


def test_sharded_bin_and_safetensors_agree(tmp_path):
    bins = Checkpoint(TINY)  # the fixture has both; the .bin index wins
    assert bins.refs["lm_head.weight"].file.suffix == ".bin"
    st = Checkpoint(_copy(tmp_path, ["model.safetensors"]))
    assert st.refs["lm_head.weight"] == st.refs["transformer.word_embeddings.weight"]  # tied when absent
    for name in bins.names():
        np.testing.assert_array_equal(bins.tensor(name), st.tensor(name))
    assert bins.lm_head_is_tied() and st.lm_head_is_tied()
    stored = bins.tensor_as_stored("transformer.word_embeddings.weight")
    assert stored.dtype == np.float16 and stored.shape == (21069, 64)
    np.testing.assert_array_equal(stored[100:103], bins.tensor("transformer.word_embeddings.weight")[100:103])
    np.testing.assert_array_equal(stored[np.array([[5, 7]])][0, 1], stored[7:8][0])


def _write_bf16_safetensors(path, tensors):
    """numpy has no bfloat16: write the file by hand (header, then raw uint16 bits)."""
    header, offset, blobs = {}, 0, []
    for name, bits in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [offset, offset + bits.nbytes]}
        offset += bits.nbytes
        blobs.append(bits.tobytes())
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_bf16_safetensors_are_widened(tmp_path):
    ckpt = Checkpoint(TINY)
    tensors = {n: (ckpt.tensor(n).view(np.uint32) >> 16).astype(np.uint16)
               for n in ckpt.names() if n != "lm_head.weight"}
    path = _copy(tmp_path, [])
    _write_bf16_safetensors(path / "model.safetensors", tensors)
    widened = Checkpoint(path).tensor("transformer.final_layernorm.weight")
    np.testing.assert_allclose(widened, ckpt.tensor("transformer.final_layernorm.weight"), rtol=1e-2)
    assert widened.dtype == np.float32


def test_truncated_shard_names_the_file(tmp_path):
    path = _copy(tmp_path, ["pytorch_model.bin.index.json", "pytorch_model-00002-of-00002.bin"])
    data = (TINY / "pytorch_model-00001-of-00002.bin").read_bytes()
    (path / "pytorch_model-00001-of-00002.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00002.bin"):
        Checkpoint(path)


def test_truncated_safetensors_names_the_tensor_file(tmp_path):
    path = _copy(tmp_path, [])
    data = (TINY / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        Checkpoint(path)


def test_missing_shard_is_named(tmp_path):
    path = _copy(tmp_path, ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin"])
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin .*missing"):
        Checkpoint(path)


def test_wrong_shape_tensor_is_named(tmp_path):
    ckpt = Checkpoint(TINY)
    tensors = {n: ckpt.tensor(n, np.float16) for n in ckpt.names() if n != "lm_head.weight"}
    tensors["transformer.layers.1.mlp.dense_h_to_4h.weight"] = np.zeros((128, 64), np.float16)
    path = _copy(tmp_path, [])
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer.layers.1.mlp.dense_h_to_4h.weight has shape \[128, 64\]"):
        Checkpoint(path)


def test_pickle_asking_for_other_globals_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = (b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
               + f"touch {marker}".encode() + b"q\x01\x85q\x02Rq\x03.")
    path = _copy(tmp_path, [])
    with zipfile.ZipFile(path / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    with pytest.raises(CheckpointError, match=r"refusing to load global os.system"):
        Checkpoint(path)
    assert not marker.exists()


def test_other_architectures_are_refused(tmp_path):
    path = _copy(tmp_path, ["model.safetensors"])
    cfg = json.loads((path / "config.json").read_text())
    cfg.update({"multi_query_attention": True, "padded_vocab_size": 65024})
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="ChatGLM2"):
        Checkpoint(path)
    del cfg["multi_query_attention"], cfg["padded_vocab_size"]
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="llama"):
        Checkpoint(path)


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)
    _copy(tmp_path, [])
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint(tmp_path)
