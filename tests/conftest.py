"""Shared fixtures: the golden ChatGLM-6B-tiny checkpoint, its recorded outputs, the reference model on it, and its
cpu bundles."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from appliance.tokenizer import ChatGLMTokenizer
from model_export.checkpoint import Checkpoint
from model_export.export import export_bundle
from model_export.reference import ReferenceEngine, ReferenceModel
from tests.history_stores import postgres, stores  # noqa: F401 - the history suite's fixtures, on both databases

# The suite never reads or writes the user's own settings, history or cache: every test starts from empty folders of
# its own run unless it points the variables elsewhere (most tests do, per test, with monkeypatch).
_FOLDERS = Path(tempfile.mkdtemp(prefix="streamchat-tests-"))
for _name in ("CONFIG", "DATA", "CACHE"):
    os.environ.setdefault(f"STREAMCHAT_{_name}_DIR", str(_FOLDERS / _name.lower()))

TINY = Path(__file__).parent / "fixtures" / "chatglm6b-tiny"
GOLDEN = json.loads((TINY / "golden.json").read_text(encoding="utf-8"))
PROMPTS = {p["name"]: p for p in GOLDEN["prompts"]}


@pytest.fixture(scope="session")
def golden() -> dict:
    return GOLDEN


@pytest.fixture(scope="session")
def tokenizer() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_dir(TINY)


@pytest.fixture(scope="session")
def reference() -> ReferenceModel:
    return ReferenceModel.from_checkpoint(Checkpoint(TINY))


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {q: export_bundle(TINY, root / q, quant=q).bundle for q in ("fp32", "fp16", "int8", "int4")}


@pytest.fixture(scope="session")
def reference_engine(reference: ReferenceModel) -> ReferenceEngine:
    return ReferenceEngine(reference)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The golden fixture as an fp32 cpu bundle (the window's tests), one per test module: a test may change it."""
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return export_bundle(TINY, tmp_path_factory.mktemp("tiny") / "tiny", quant="fp32").bundle


@pytest.fixture
def app_dirs(tmp_path, monkeypatch) -> Path:
    """Settings and data folders of the test's own, under ``tmp_path``."""
    monkeypatch.setenv("STREAMCHAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


_EXIT_STATUS = {"code": 0}


def pytest_sessionfinish(session, exitstatus) -> None:
    _EXIT_STATUS["code"] = int(exitstatus)


def pytest_unconfigure(config) -> None:
    """After the summary is printed, leave without interpreter finalisation when Qt was loaded: PySide6 6.x can abort
    while garbage-collecting its wrappers at shutdown ("bool_dealloc"), which would turn a green run red."""
    import os
    import sys

    if "PySide6" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS["code"])
