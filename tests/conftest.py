"""Shared fixtures.

The real test model is fetched by `make test` before pytest runs, so tests that need it never skip.
Vocab-only GGUFs with real metadata live in the `shared/` checkout beside the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_orcd import hub

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = REPO_ROOT / ".." / "shared" / "testdata"


@pytest.fixture(scope="session")
def qwen_gguf_path() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file."""
    path = hub.model_path()
    if not path.is_file():
        raise FileNotFoundError(f"test model missing: {path} (run `worker-orcd pull` first)")
    return path


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """Vocab-only GGUFs (phi-3, qwen2, llama-spm) with their tokenizer conformance cases."""
    path = TESTDATA / "vocab"
    if not path.is_dir():
        raise FileNotFoundError(f"shared test data missing: {path}")
    return path
