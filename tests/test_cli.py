"""`worker-orcd generate` and `pull` from the command line, in process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.hf_gguf import make_qwen2, write_gguf
from worker_orcd import cli, testdata
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import SamplingParams


def test_generate_prints_the_text_then_load_time_and_speeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_gguf(make_qwen2(), tmp_path / "qwen2.gguf")
    argv = ["generate", "--model", str(path), "--prompt", "Hello, world!", "--max-tokens", "5"]
    assert cli.main(["--log-level", "warning", *argv, "--temperature", "0"]) == 0
    out, err = capsys.readouterr()

    ref = Engine.load(path).generate("Hello, world!", SamplingParams(max_tokens=5, temperature=0))
    assert out == ref.text + "\n"
    line = err.strip().splitlines()[-1]
    n = len(ref.prompt_ids)
    pattern = (
        rf"\[load \d+\.\d s \| prompt {n} tokens, prefill \d+\.\d tok/s \| "
        rf"5 tokens out, decode \d+\.\d tok/s \| {ref.stop_reason.value}\]"
    )
    assert re.fullmatch(pattern, line), line


def test_pull_testdata_print_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORKER_ORCD_CACHE", str(tmp_path))
    assert cli.main(["pull", "--testdata", "--print-path"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'testdata' / 'llama-cpp-python-0.3.36'}\n"
    assert set(testdata.missing()) == set(testdata.VOCAB_TESTDATA.files)  # nothing fetched
