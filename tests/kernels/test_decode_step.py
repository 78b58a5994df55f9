"""The greedy pick of a captured decode step (`decode_step.argmax_advance`) against torch.argmax:
the first index of the largest logit, NaN counted as the largest, a row of -inf giving 0, and the
graph's inputs advanced (next id in, position + 1). Real vocabularies on the GPU (marker `gpu`);
the same cases at small sizes on CPU under Triton's interpreter (TRITON_INTERPRET=1), skipped
otherwise."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import GPU, INTERPRETED

VOCABS = {"cuda": [151936, 32064, 2049, 7], "cpu": [5000, 2048, 7]}


def _logits(rows: int, v: int, device: str, seed: int) -> torch.Tensor:
    """Random logits with the awkward cases planted: a tie across two chunks, a tie inside one
    chunk, a NaN after a larger value, a row of -inf, a row whose maximum is its last id."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, v, generator=g) * 4
    for r in range(rows):
        kind = r % 5
        top = x[r].max() + 1
        if kind == 1:  # the same maximum in two places: the first wins
            x[r, v // 3], x[r, v - 1] = top, top
        elif kind == 2 and v > 3:
            x[r, 1], x[r, 2] = top, top
        elif kind == 3:
            x[r, 0], x[r, v // 2] = top + 5, float("nan")
        elif kind == 4:
            x[r] = float("-inf")
        else:
            x[r, v - 1] = top
    return x.to(device)


@pytest.mark.parametrize("device", [GPU, INTERPRETED])
@pytest.mark.parametrize("rows", [1, 5, 16, 64])
def test_argmax_advance_picks_as_torch(device: str, rows: int) -> None:
    from worker_orcd.kernels.triton import decode_step

    for i, v in enumerate(VOCABS[device]):
        logits = _logits(rows, v, device, seed=100 * rows + i)
        ids = torch.full((rows,), -7, dtype=torch.int64, device=device)
        pos = torch.arange(rows, dtype=torch.int64, device=device) * 3
        next_ids = decode_step.argmax_advance(logits, ids, pos)
        want = torch.argmax(logits, dim=-1)
        assert torch.equal(next_ids, want), (v, next_ids.tolist(), want.tolist())
        assert torch.equal(ids, want)
        assert torch.equal(pos, torch.arange(rows, device=device) * 3 + 1)


@pytest.mark.parametrize("device", [GPU, INTERPRETED])
def test_argmax_advance_reads_a_strided_view(device: str) -> None:
    """Rows of a wider tensor (a padded vocabulary): only the first V columns count."""
    from worker_orcd.kernels.triton import decode_step

    wide = _logits(3, 3000, device, seed=7)
    wide[:, 2500:] = 1e9
    view = wide[:, :2500]
    ids = torch.zeros(3, dtype=torch.int64, device=device)
    pos = torch.zeros(3, dtype=torch.int64, device=device)
    assert torch.equal(decode_step.argmax_advance(view, ids, pos), torch.argmax(view, dim=-1))
