"""Paths and test vectors of the vocab-only GGUFs in shared/testdata/vocab."""

from __future__ import annotations

from pathlib import Path

VOCAB_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "testdata" / "vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"


def vocab_path(name: str) -> Path:
    path = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"shared tokenizer test data missing: {path}")
    return path


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs from X.gguf.inp and X.gguf.out (llama.cpp test-tokenizer-0)."""
    path = vocab_path(name)
    texts = Path(f"{path}.inp").read_text(encoding="utf-8").split(SEPARATOR)
    if texts[-1] != "":
        raise ValueError(f"{path}.inp does not end with the separator line")
    texts.pop()
    lines = Path(f"{path}.out").read_text(encoding="utf-8").split("\n")
    ids = [[int(x) for x in line.split()] for line in lines[: len(texts)]]
    if len(ids) != len(texts):
        raise ValueError(f"{path}: {len(texts)} inputs but {len(ids)} expected outputs")
    return list(zip(texts, ids, strict=True))
