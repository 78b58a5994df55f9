"""Engine fixtures: a small random Phi-3 engine shared by a test module."""

from __future__ import annotations

import pytest

from tests.support.hf_gguf import make_phi3, write_gguf
from worker_orcd.engine.engine import Engine


@pytest.fixture(scope="module")
def phi3_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """Random 4-layer Phi-3 with the real Phi-3 tokenizer (padded vocab with unused ids), context
    256."""
    path = write_gguf(make_phi3(), tmp_path_factory.mktemp("engine") / "phi3.gguf")
    return Engine.load(path, max_context=256)
