"""`--weights` and the batch flags on `worker-orcd generate` and `serve`: parsed, checked, passed to
Engine.load, reported."""

from __future__ import annotations

import logging
import socket
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from worker_orcd import cli
from worker_orcd.server import loading
from worker_orcd.server.main import bind_or_log
from worker_orcd.server.options import ServerSettings


def _serve_settings(*flags: str) -> ServerSettings:
    args = cli.build_parser().parse_args(["serve", "--model", "m.gguf", "--port", "0", *flags])
    return ServerSettings.from_args(args)


def test_serve_weights_flag() -> None:
    assert _serve_settings().weights is None  # the engine's default for the device
    assert _serve_settings("--weights", "quantized").weights == "quantized"
    assert _serve_settings("--weights", "dequantized").weights == "dequantized"
    with pytest.raises(SystemExit):
        _serve_settings("--weights", "int4")


class _Loaded(Exception):
    pass


def _capture_load(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    from worker_orcd.engine.engine import Engine

    seen: dict[str, Any] = {}

    def fake_load(path: object, **kwargs: Any) -> None:
        seen.update(kwargs, path=path)
        raise _Loaded

    monkeypatch.setattr(Engine, "load", fake_load)
    return seen


@pytest.mark.parametrize("weights", [None, "quantized", "dequantized"])
def test_generate_passes_weights_to_engine_load(
    weights: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture_load(monkeypatch)
    argv = ["generate", "--model", "m.gguf", "--prompt", "hi"]
    args = cli.build_parser().parse_args(argv + (["--weights", weights] if weights else []))
    with pytest.raises(_Loaded):
        cli.cmd_generate(args)
    assert seen["weights"] == weights and seen["path"] == "m.gguf"


def test_serve_passes_weights_to_engine_load(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_load(monkeypatch)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    args = cli.build_parser().parse_args(
        ["serve", "--model", str(model), "--port", "0", "--device", "cpu", "--weights", "quantized"]
    )
    with pytest.raises(_Loaded):
        loading.load_engine(ServerSettings.from_args(args))
    assert seen["weights"] == "quantized" and seen["device"] == "cpu"


def test_serve_passes_the_batch_budget_to_engine_load(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture_load(monkeypatch)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    flags = ["--max-num-seqs", "8", "--max-batch-tokens", "512", "--kv-cache-tokens", "4096"]
    args = cli.build_parser().parse_args(
        ["serve", "--model", str(model), "--port", "0", "--device", "cpu", *flags]
    )
    settings = ServerSettings.from_args(args)
    with pytest.raises(_Loaded):
        loading.load_engine(settings)
    assert (seen["max_num_seqs"], seen["max_batch_tokens"], seen["kv_cache_tokens"]) == (
        8,
        512,
        4096,
    )
    assert seen["gpu_memory_utilization"] == 0.9
    defaults = _serve_settings()
    assert (defaults.max_num_seqs, defaults.max_batch_tokens, defaults.kv_cache_tokens) == (
        64,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1 (got 0)"),
        (["--kv-cache-tokens", "-5"], "--kv-cache-tokens must be >= 1 (got -5)"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
        (["--max-queue", "-1"], "--max-queue must be >= 0 (got -1)"),
    ],
)
def test_serve_rejects_a_bad_batch_budget(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        _serve_settings(*flags)
    assert message in str(info.value)


def test_model_facts_report_weights_and_their_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    info = SimpleNamespace(
        model_name="m",
        architecture="qwen2",
        device="cpu",
        dtype="float32",
        weights="quantized",
        weight_mix={"Q4_K": 100, "float32": 20},
        weight_bytes=120,
        kv_cache_bytes=8,
        quant_mix={"Q4_K": 3, "F32": 2},
        tokenizer_kind="bpe",
        vocab_size=10,
        context_length=16,
    )
    monkeypatch.setattr(loading, "quant_kind", lambda path, mix: "Q4_K_M")
    facts = loading.model_facts(SimpleNamespace(info=lambda: info), _serve_settings())
    assert (facts.quant_kind, facts.weights) == ("Q4_K_M", "quantized")
    assert facts.weight_mix == {"Q4_K": 100, "float32": 20}


def test_a_taken_port_is_one_bind_failed_line(caplog: pytest.LogCaptureFixture) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        settings = _serve_settings("--host", "127.0.0.1", "--worker-id", "w")
        settings = replace(settings, port=port)
        with caplog.at_level(logging.INFO, logger="worker_orcd"):
            assert bind_or_log(settings) is None
    finally:
        taken.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith(f"error worker_id=w code=BIND_FAILED host=127.0.0.1 port={port} ")
    # the port free again: the same settings bind
    sock = bind_or_log(settings)
    assert sock is not None and sock.getsockname()[1] == port
    sock.close()
