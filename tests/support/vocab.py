"""llama.cpp's vocab-only GGUFs and their tokenizer vectors, as `make test` puts them in the cache.

`worker-orcd pull --testdata` (run by `make test` before pytest) fetches them; see
`worker_orcd.testdata`.
"""

from __future__ import annotations

from pathlib import Path

from worker_orcd import testdata

SEPARATOR = "\n__ggml_vocab_test__\n"


def vocab_dir() -> Path:
    """The folder of the vocab files; an error naming the command that fetches them if absent."""
    absent = testdata.missing()
    if absent:
        raise FileNotFoundError(
            f"tokenizer test data missing from {testdata.testdata_dir()}: {', '.join(absent)} "
            "(run `worker-orcd pull --testdata`; `make test` does)"
        )
    return testdata.testdata_dir()


def vocab_path(name: str) -> Path:
    """ggml-vocab-NAME.gguf (NAME: phi-3, qwen2, llama-spm)."""
    return vocab_dir() / f"ggml-vocab-{name}.gguf"


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
