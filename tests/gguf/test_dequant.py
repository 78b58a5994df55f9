"""Torch dequantization is bit-identical to the numpy reference in `gguf.quants`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from worker_orcd.gguf import DEQUANTIZERS, GGUFFile, dequantize
from worker_orcd.gguf import dequant as dequant_module

logger = logging.getLogger(__name__)

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
ALL_TYPES += [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Byte ranges of the fp16 scales inside one block: random bytes there could be NaN/inf.
FP16_FIELDS: dict[Q, list[int]] = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}  # fmt: skip


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """[n_blocks, type_size] uint8: random quants with finite fp16 scales (or random floats)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if qtype in (Q.F32, Q.F16, Q.BF16):
        x = rng.standard_normal(n_blocks, dtype=np.float32) * 10
        return gguf.quants.quantize(x, qtype).view(np.uint8).reshape(n_blocks, size)
    b = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for pos in FP16_FIELDS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        b[:, pos : pos + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return b


def reference(blocks: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    rows = blocks.reshape(shape[:-1] + (-1,)) if len(shape) > 1 else blocks.reshape(-1)
    return gguf.quants.dequantize(rows, qtype).reshape(shape)


def assert_bit_exact(out: torch.Tensor, ref: np.ndarray) -> None:
    assert out.dtype == torch.float32 and tuple(out.shape) == ref.shape
    got = out.cpu().numpy().view(np.uint32)
    want = np.ascontiguousarray(ref, dtype=np.float32).view(np.uint32)
    if not np.array_equal(got, want):
        bad = np.flatnonzero(got != want)
        raise AssertionError(
            f"{bad.size} of {got.size} values differ; first at {bad[0]}: "
            f"{out.reshape(-1)[bad[0]].item()!r} != {ref.reshape(-1)[bad[0]]!r}"
        )


def test_registry_covers_every_type():
    assert set(DEQUANTIZERS) == set(ALL_TYPES)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (3, 7), (37, 5)])
def test_random_blocks_bit_exact(qtype: Q, rows: int, blocks_per_row: int):
    rng = np.random.default_rng([int(qtype), rows])
    block = GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(qtype, rows * blocks_per_row, rng)
    shape = (rows, blocks_per_row * block)
    out = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, shape)
    assert_bit_exact(out, reference(raw, qtype, shape))


# Relative RMS error of a round trip through the reference quantizer (a loose sanity bound).
QUANT_ERROR = {Q.Q4_0: 0.15, Q.Q4_1: 0.15, Q.Q5_0: 0.08, Q.Q5_1: 0.08, Q.Q8_0: 0.01}
QUANT_ERROR |= {Q.F16: 1e-3, Q.BF16: 1e-2}
QUANTIZABLE = list(QUANT_ERROR)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_quantized_weights_bit_exact_and_close(qtype: Q):
    """Blocks made by the reference quantizer from weight-like data: exact, and near the input."""
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((16, 256), dtype=np.float32) * 0.02
    raw = gguf.quants.quantize(x, qtype)
    out = dequantize(torch.from_numpy(raw.view(np.uint8).reshape(-1).copy()), qtype, x.shape)
    assert_bit_exact(out, gguf.quants.dequantize(raw, qtype))
    rel_rms = ((out - torch.from_numpy(x)).norm() / torch.from_numpy(x).norm()).item()
    assert rel_rms < QUANT_ERROR[qtype], rel_rms


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_1, Q.Q3_K, Q.Q6_K], ids=lambda q: q.name)
def test_chunked_path_and_3d_shape(qtype: Q, monkeypatch: pytest.MonkeyPatch):
    block = GGML_QUANT_SIZES[qtype][0]
    # Force several chunks with a ragged last one: 3 * 5 * 3 = 45 blocks in chunks of 4.
    monkeypatch.setitem(dequant_module._CHUNK_ELEMENTS, "cpu", 4 * block)
    raw = random_blocks(qtype, 45, np.random.default_rng(5))
    shape = (3, 5, 3 * block)
    out = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, shape)
    assert_bit_exact(out, reference(raw, qtype, shape))


def test_unaligned_input_bytes():
    """A byte tensor that starts at an odd address (e.g. a slice) still dequantizes."""
    raw = random_blocks(Q.Q5_0, 8, np.random.default_rng(3)).reshape(-1)
    buf = torch.zeros(raw.size + 1, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(raw)
    out = dequantize(buf[1:], Q.Q5_0, (8 * 32,))
    assert_bit_exact(out, reference(raw, Q.Q5_0, (8 * 32,)))


def test_wrong_sizes_are_rejected():
    data = torch.zeros(34 * 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 102 bytes, got 68"):
        dequantize(data, Q.Q8_0, (96,))
    with pytest.raises(ValueError, match="not whole Q8_0 blocks"):
        dequantize(data, Q.Q8_0, (2, 34))
    with pytest.raises(ValueError, match="expected uint8"):
        dequantize(data.view(torch.int16), Q.Q8_0, (32,))
    with pytest.raises(ValueError, match="no dequantizer for quant type IQ2_XXS"):
        dequantize(data, Q.IQ2_XXS, (256,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_cuda_bit_exact(qtype: Q):
    rng = np.random.default_rng(int(qtype) + 100)
    block = GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(qtype, 64 * 9, rng)
    shape = (64, 9 * block)
    out = dequantize(torch.from_numpy(raw.reshape(-1).copy()).cuda(), qtype, shape)
    assert out.is_cuda
    assert_bit_exact(out, reference(raw, qtype, shape))


@pytest.mark.slow
def test_every_tensor_of_the_real_file_bit_exact(qwen_gguf_path: Path):
    """Every tensor, loaded whole; the two 136M-value matrices are compared on sampled rows."""
    rng = np.random.default_rng(0)
    elapsed = 0.0
    n_values = 0
    with GGUFFile.open(qwen_gguf_path) as f:
        for info in f.tensors.values():
            start = time.perf_counter()
            out = f.load(info.name)
            elapsed += time.perf_counter() - start
            n_values += out.numel()
            rows = f.raw(info.name).reshape(info.shape[:-1] + (-1,))
            if out.numel() > 1 << 24:
                idx = np.sort(rng.choice(rows.shape[0], 2048, replace=False))
                rows, out = rows[idx], out[torch.from_numpy(idx)]
            try:
                assert_bit_exact(out, gguf.quants.dequantize(rows, info.qtype))
            except AssertionError as e:
                raise AssertionError(f"{info.name} ({info.qtype.name}): {e}") from None
    assert n_values == 630_167_424
    logger.info("dequantized the whole file (%d values) in %.2f s", n_values, elapsed)
