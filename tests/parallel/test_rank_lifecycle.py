"""The life of the ranks of a tensor-parallel engine: a clean stop, errors of any rank raised on
rank 0 (at load and in a pass), sizes that do not split refused before any rank starts, and no
follower that outlives rank 0. Each test runs its own ranks (one tensor-parallel engine per
process), after the previous test's have stopped."""

from __future__ import annotations

import multiprocessing
import signal
from pathlib import Path

import pytest
import torch.distributed as dist
from gguf import GGMLQuantizationType as Q

import worker_orcd.engine.engine as engine_module
from tests.model.conftest import random_ids, rel_err
from tests.parallel.scripts import THEN_DIE, run_rank0
from tests.parallel.shards import FailingPass
from tests.support.hf_gguf import make_phi3, make_qwen2, write_gguf
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.parallel import GGUFShard, TensorParallelError
from worker_orcd.engine.types import SamplingParams
from worker_orcd.errors import ModelLoadError

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def phi3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(make_phi3(seed=1), tmp_path_factory.mktemp("tp") / "phi3.gguf")


def test_quantized_weights_over_two_ranks(tmp_path: Path) -> None:
    """Q8_0 projections (o_proj's 32 columns per rank stay whole blocks) and a Q4_K ffn_down whose
    384 columns per rank do not (that part is dequantized). On the CPU a rank's blocks are
    multiplied by the torch reference (dequantize, then float32), not the CPU kernels, which take
    whole tensors of the memory map: the logits are the one-process dequantized ones."""
    qtypes = {"attn_q": Q.Q8_0, "attn_k": Q.Q8_0, "attn_v": Q.Q8_0, "attn_output": Q.Q8_0}
    qtypes |= {"ffn_gate": Q.Q8_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_K, "token_embd": Q.Q5_0}
    hf = make_qwen2(seed=2, intermediate_size=768, num_hidden_layers=2)
    path = write_gguf(hf, tmp_path / "q.gguf", qtypes=qtypes, sync_model=True)
    one = Engine.load(path, max_context=64, weights="dequantized")
    two = Engine.load(path, max_context=64, weights="quantized", tensor_parallel_size=2)
    try:
        ids = random_ids(19, one.config.vocab_size, seed=3)
        assert rel_err(two.score(ids), one.score(ids)) < REL_TOL
    finally:
        two.runner.close()
    assert [p.exitcode for p in two.runner.group.procs] == [0]  # a clean stop
    assert not dist.is_initialized()


def test_three_ranks_and_a_vocabulary_they_do_not_divide(tmp_path: Path) -> None:
    """Qwen's 151936 ids over 3 ranks: parts of 50646, 50646 and 50644 rows, the head's logits
    gathered from parts of unequal length."""
    dims = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=192)
    hf = make_qwen2(seed=4, **dims)
    path = write_gguf(hf, tmp_path / "qwen-tp3.gguf")
    one = Engine.load(path, max_context=64)
    three = Engine.load(path, max_context=64, tensor_parallel_size=3)
    try:
        assert three.model.model.embed_tokens.weight.shape[0] == 50646
        ids = random_ids(23, one.config.vocab_size, seed=5) + [151935]  # the last id: rank 2's
        assert rel_err(three.score(ids), one.score(ids)) < REL_TOL
    finally:
        three.runner.close()
    assert [p.exitcode for p in three.runner.group.procs] == [0, 0]


def test_sizes_that_do_not_split_fail_before_any_rank_starts(phi3_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"size 3 .* attention heads = 4, KV heads = 4 and "):
        Engine.load(phi3_path, max_context=64, tensor_parallel_size=3)
    with pytest.raises(ModelLoadError, match=r"tensor_parallel_size must be a positive integer"):
        Engine.load(phi3_path, max_context=64, tensor_parallel_size=0)
    assert multiprocessing.active_children() == []


def test_a_follower_that_cannot_load_fails_the_load(
    phi3_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = tmp_path / "gone.gguf"
    monkeypatch.setattr(engine_module, "GGUFShard", lambda _, *rest: GGUFShard(str(gone), *rest))
    with pytest.raises(ModelLoadError, match=r"tensor-parallel rank 1: cannot open model file"):
        Engine.load(phi3_path, max_context=64, tensor_parallel_size=2)
    assert not dist.is_initialized()  # rank 0 left the group: the next engine can make one
    assert multiprocessing.active_children() == []


def test_a_follower_error_in_a_pass_surfaces_on_rank_0(
    phi3_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "GGUFShard", lambda *a: FailingPass(GGUFShard(*a), 1))
    engine = Engine.load(phi3_path, max_context=64, tensor_parallel_size=2)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    expected = r"rank 1 failed in a forward pass: RuntimeError: injected failure in this rank's MLP"
    with pytest.raises(TensorParallelError, match=expected):
        engine.generate("Hello", params)
    assert [p.exitcode for p in engine.runner.group.procs] == [1]
    with pytest.raises(TensorParallelError, match=expected):  # failed for good, and at once
        engine.generate("Hello", params)
    assert not dist.is_initialized()


def test_followers_exit_when_rank_0_dies(phi3_path: Path, tmp_path: Path) -> None:
    """Rank 0 is killed while its follower waits for a pass: the follower exits."""
    done = run_rank0(phi3_path, "cpu", tmp_path, THEN_DIE)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert (tmp_path / "pids").read_text().split()  # the follower had started
