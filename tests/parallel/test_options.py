"""`--tensor-parallel-size` on generate, serve and bench: parsed in one place, passed to
Engine.load."""

from __future__ import annotations

from typing import Any

import pytest

from worker_orcd import cli


class _Loaded(Exception):
    pass


def test_generate_passes_the_size_to_engine_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker_orcd.engine.engine import Engine

    seen: dict[str, Any] = {}

    def fake_load(path: object, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Loaded

    monkeypatch.setattr(Engine, "load", fake_load)
    argv = ["generate", "--model", "m.gguf", "--prompt", "hi"]
    for flags, size in (([], 1), (["--tensor-parallel-size", "2"], 2)):
        with pytest.raises(_Loaded):
            cli.cmd_generate(cli.build_parser().parse_args(argv + flags))
        assert seen["tensor_parallel_size"] == size


@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
def test_the_size_must_be_positive(command: str, capsys: pytest.CaptureFixture) -> None:
    argv = {
        "generate": ["generate", "--model", "m.gguf", "--prompt", "hi"],
        "serve": ["serve", "--model", "m.gguf", "--port", "0"],
        "bench": ["bench", "--preset", "phi3-mini"],
    }[command]
    assert cli.build_parser().parse_args(argv + ["--tensor-parallel-size", "4"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(argv + ["--tensor-parallel-size", "0"])
    assert "--tensor-parallel-size: must be an integer >= 1 (got 0)" in capsys.readouterr().err


def test_serve_passes_the_size_to_engine_load(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker_orcd.engine.engine import Engine
    from worker_orcd.server import loading
    from worker_orcd.server.options import ServerSettings

    seen: dict[str, Any] = {}

    def fake_load(path: object, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise _Loaded

    monkeypatch.setattr(Engine, "load", fake_load)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    argv = ["serve", "--model", str(model), "--port", "0", "--device", "cpu"]
    args = cli.build_parser().parse_args(argv + ["--tensor-parallel-size", "2"])
    with pytest.raises(_Loaded):
        loading.load_engine(ServerSettings.from_args(args))
    assert seen["tensor_parallel_size"] == 2
