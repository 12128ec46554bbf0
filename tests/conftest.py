"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from specserve.config import EngineConfig
from specserve.engine.llm_engine import LLMEngine
from tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=8, max_model_len=256))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from specserve.models.default_model import default_model_dir

    return default_model_dir()
