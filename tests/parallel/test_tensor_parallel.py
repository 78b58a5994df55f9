"""Tensor parallel over 2 ranks on CPU (gloo): the results of one process, every rank's error on
rank 0, and no rank left behind.

The one-process engine is the reference: same file, same float32 weights, so the two differ only in
the order of the sums the all-reduces split (rel. error ~1e-7; the bound is 1e-5).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.model.conftest import prefill_then_decode, random_ids, rel_err
from tests.parallel.shards import RankSum
from tests.support.hf_gguf import make_phi3, write_gguf
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def phi3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 4-layer Phi-3 (4 heads MHA, FFN 256) with the real Phi-3 tokenizer."""
    return write_gguf(make_phi3(seed=1), tmp_path_factory.mktemp("tp") / "phi3.gguf")


@pytest.fixture(scope="module")
def phi3_engines(phi3_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """(one process, two ranks) on the same file."""
    one = Engine.load(phi3_path, max_context=256)
    two = Engine.load(phi3_path, max_context=256, tensor_parallel_size=2)
    yield one, two
    two.runner.close()


def test_phi3_logits_equal_one_process(phi3_engines: tuple[Engine, Engine]) -> None:
    one, two = phi3_engines
    assert two.info().tensor_parallel_size == 2 and one.info().tensor_parallel_size == 1
    assert two.runner.kv.k.shape[2] == 2  # each rank caches its 2 of the 4 KV heads
    ids = random_ids(40, one.config.vocab_size, seed=1)
    assert rel_err(two.score(ids), one.score(ids)) < REL_TOL
    stepped = prefill_then_decode(two, ids[:31], ids[31:])
    assert rel_err(stepped, prefill_then_decode(one, ids[:31], ids[31:])) < REL_TOL


def test_phi3_greedy_generation_equals_one_process(phi3_engines: tuple[Engine, Engine]) -> None:
    one, two = phi3_engines
    params = SamplingParams(max_tokens=12, temperature=0.0)
    ids = one.encode_prompt(messages=[{"role": "user", "content": "Name three rivers."}])
    ours = two.generate(ids, params)
    assert ours.token_ids == one.generate(ids, params).token_ids
    assert len(ours.token_ids) == 12


def test_a_call_runs_on_every_rank(phi3_engines: tuple[Engine, Engine]) -> None:
    _, two = phi3_engines
    assert two.runner.group.call(RankSum()) == (1.0 + 2.0, "cpu")
