"""Quantized weights on the CPU: loaded as views of the file's memory map, looked up and multiplied
through the CPU containers (kernels/cpu/weights.py), and chosen by default where the kernels are
built."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from worker_orcd.config import ModelConfig
from worker_orcd.engine.engine import resolve_weights
from worker_orcd.gguf import GGUFFile
from worker_orcd.kernels.cpu import ops
from worker_orcd.kernels.cpu.weights import CpuPackedWeight, CpuQuantizedWeight
from worker_orcd.kernels.quant.formats import random_blocks
from worker_orcd.kernels.quant.ops import int8_x_reference
from worker_orcd.loader import load_model

CPU = torch.device("cpu")
TYPES = (Q.Q8_0, Q.Q5_0, Q.Q4_0)


def _quantized_file(tiny_model: Callable, write_gguf: Callable) -> tuple[Path, Any]:
    """The tiny qwen2 model with every 2-D tensor quantized (types in turn), as a GGUF file."""
    m = tiny_model("qwen2")
    for i, (name, t) in enumerate(list(m.tensors.items())):
        if t.ndim == 2:
            qtype = TYPES[i % len(TYPES)]
            m.tensors[name] = (quants.quantize(t, qtype), qtype)
    return write_gguf(m), m


def test_loaded_blocks_are_views_of_the_map(tiny_model: Callable, write_gguf: Callable) -> None:
    path, m = _quantized_file(tiny_model, write_gguf)
    with GGUFFile.open(path) as f:
        config = ModelConfig.from_gguf(f)
        model, report = load_model(
            f, config, device=CPU, dtype=torch.float32, max_positions=64, weights="quantized"
        )
        views = {name: f.view(name) for name in f.tensors}
    seen = 0
    for module in model.modules():
        packed = getattr(module, "quantized", None)
        if packed is None:
            continue
        assert isinstance(packed, CpuPackedWeight)
        for _, part in packed.parts:
            assert isinstance(part, CpuQuantizedWeight)
            hits = [n for n, v in views.items() if v.data_ptr() == part.blocks.data_ptr()]
            assert len(hits) == 1 and views[hits[0]].numel() == part.nbytes  # no copy
            seen += 1
    assert seen == sum(1 for t in m.tensors.values() if isinstance(t, tuple))
    on_file = sum(t.n_bytes for t in GGUFFile.open(path).tensors.values())
    assert report.weight_bytes == on_file  # quantized bytes as on file, F32 norms copied


def test_embedding_dequantizes_the_rows_asked_for() -> None:
    raw = random_blocks(Q.Q5_0, 300, 64, generator=torch.Generator().manual_seed(0))
    w = CpuQuantizedWeight.from_gguf(raw, Q.Q5_0, (300, 64))
    ids = torch.tensor([[3, 299], [0, 3]])
    rows = w.embedding(ids, torch.float32)
    assert rows.shape == (2, 2, 64)
    assert torch.equal(rows.reshape(4, 64), w.dequantize()[ids.reshape(-1)])
    many = torch.arange(299, -1, -1)  # past the few rows the compiled lookup takes
    assert torch.equal(w.embedding(many, torch.float32), w.dequantize().flip(0))
    with pytest.raises(IndexError, match="row 300 out of range"):
        w.embedding(torch.tensor([300]), torch.float32)


def test_packed_weight_mixes_quantized_and_dense_parts() -> None:
    g = torch.Generator().manual_seed(1)
    q0 = CpuQuantizedWeight.from_gguf(
        random_blocks(Q.Q8_0, 20, 256, generator=g), Q.Q8_0, (20, 256)
    )
    dense = torch.randn(12, 256, generator=g)
    q1 = CpuQuantizedWeight.from_gguf(random_blocks(Q.Q6_K, 9, 256, generator=g), Q.Q6_K, (9, 256))
    packed = CpuPackedWeight.pack([q0, dense, q1])
    assert (packed.n, packed.k) == (41, 256) and [r for r, _ in packed.parts] == [0, 20, 32]
    assert packed.quant_mix() == {"Q8_0": q0.nbytes, "float32": 12 * 256 * 4, "Q6_K": q1.nbytes}
    assert not packed.takes_rounded_x(1, CPU)
    x = torch.randn(2, 3, 256, generator=g)
    bias = torch.randn(41, generator=g)
    y = packed.matmul(x, bias)
    assert y.shape == (2, 3, 41)
    x2 = x.reshape(6, 256)
    want = (
        torch.cat(
            [
                int8_x_reference(x2) @ q0.dequantize().t(),
                x2 @ dense.t(),
                int8_x_reference(x2) @ q1.dequantize().t(),
            ],
            dim=1,
        )
        + bias
    )
    torch.testing.assert_close(y.reshape(6, 41), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="share k=256"):
        CpuPackedWeight.pack([q0, torch.randn(3, 128)])


def test_cpu_default_is_quantized_unless_the_kernels_are_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert resolve_weights(None, CPU) == ("quantized" if ops.available() else "dequantized")
    assert resolve_weights("dequantized", CPU) == "dequantized"
    monkeypatch.setattr(ops, "_qcpu", None)
    monkeypatch.setattr(ops, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="worker_orcd.kernels.cpu.ops"):
        assert resolve_weights(None, CPU) == "dequantized"
    assert any("CPU quantized kernels unavailable" in r.message for r in caplog.records)
