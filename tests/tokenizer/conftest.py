"""Tokenizer fixtures: llama.cpp's vocab-only GGUFs and the real Qwen model file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.vocab import vocab_path
from worker_orcd import hub
from worker_orcd.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def qwen2_tok() -> Tokenizer:
    return Tokenizer.from_gguf(vocab_path("qwen2"))


@pytest.fixture(scope="session")
def phi3_tok() -> Tokenizer:
    return Tokenizer.from_gguf(vocab_path("phi-3"))


@pytest.fixture(scope="session")
def llama_spm_tok() -> Tokenizer:
    return Tokenizer.from_gguf(vocab_path("llama-spm"))


@pytest.fixture(scope="session")
def tokenizers_by_name(
    qwen2_tok: Tokenizer, phi3_tok: Tokenizer, llama_spm_tok: Tokenizer
) -> dict[str, Tokenizer]:
    return {"qwen2": qwen2_tok, "phi-3": phi3_tok, "llama-spm": llama_spm_tok}


@pytest.fixture(scope="session")
def qwen_model_file() -> Path:
    path = hub.model_path()
    if not path.is_file():
        raise FileNotFoundError(f"test model missing: {path} (run `worker-orcd pull` first)")
    return path


@pytest.fixture(scope="session")
def qwen_model_tok(qwen_model_file: Path) -> Tokenizer:
    return Tokenizer.from_gguf(qwen_model_file)
