"""Shared fixtures: the golden ChatGLM-6B-tiny checkpoint, its recorded outputs and the reference model on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.tokenizer import ChatGLMTokenizer
from model_export.checkpoint import Checkpoint
from model_export.reference import ReferenceEngine, ReferenceModel

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
def reference_engine(reference: ReferenceModel) -> ReferenceEngine:
    return ReferenceEngine(reference)
