"""`worker-orcd generate`, `pull` and `bench --device cpu --streams` from the command line, in
process."""

from __future__ import annotations

import json
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


def test_bench_streams_on_cpu_runs_the_batched_workload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_gguf(make_qwen2(), tmp_path / "qwen2.gguf")
    out_json = tmp_path / "streams.json"
    argv = ["bench", "--device", "cpu", "--model", str(path), "--streams", "1", "3"]
    argv += ["--prompt-tokens", "8", "--gen-tokens", "4", "--json", str(out_json)]
    assert cli.main(["--log-level", "warning", *argv]) == 0
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    rows = data["streams"]
    assert [r["streams"] for r in rows] == [1, 3]
    for r in rows:  # the engine ran: prompts filled and tokens decoded; no CUDA graph on the CPU
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ms_per_token"] > 0
        assert r["graph_decode_tok_s"] is None
    table = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d", line)]
    assert [t[0] for t in table] == ["1", "3"]
    assert "8 prompt + 4 generated" in out
    # each row's GB/s as a share of the read bandwidth measured in the same run
    assert data["read_gbs"] > 0 and " %read " in out
    for r, t in zip(rows, table, strict=True):
        assert t[5] == f"{100 * r['decode_gbs'] / data['read_gbs']:.0f}%"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--streams", "0"], "--streams: must be an integer >= 1 (got 0)"),
        (["--streams", "2", "-1"], "--streams: must be an integer >= 1 (got -1)"),
        (
            ["--streams", "1", "--prompt-tokens", "0"],
            "--prompt-tokens: must be an integer >= 1 (got 0)",
        ),
        (["--streams", "1", "--gen-tokens", "0"], "--gen-tokens: must be an integer >= 1 (got 0)"),
    ],
)
def test_bench_refuses_counts_below_one(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--device", "cpu", *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_streams_refuses_a_workload_longer_than_the_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_gguf(make_qwen2(), tmp_path / "qwen2.gguf")
    argv = ["bench", "--device", "cpu", "--model", str(path), "--streams", "1"]
    argv += ["--max-context", "16", "--prompt-tokens", "16", "--gen-tokens", "4"]
    assert cli.main(["--log-level", "warning", *argv]) == 2
    expected = (
        "bench --streams: prompt of 16 tokens + max_tokens 5 = 21 exceeds the context of 16 tokens"
    )
    assert capsys.readouterr().out.strip() == expected
