"""Several CUDA GPUs (NCCL): a real-size random Phi-3 (Phi-3-mini's layer dims, 2 layers) in bf16
and in Q4_K_M-style blocks over 2 and 4 GPUs against one GPU, and a failing or dying rank that
ends with an error, not a hang. Run with `pytest -m gpu tests/parallel` on a machine of 2 or more
GPUs (the TP 4 cases need 4).

Tolerance as in tests/model/test_gpu.py: each engine's error against transformers float32 on CPU
is bf16 rounding; split over N GPUs it must stay within 1.5x one GPU's (plus a floor), and the
greedy tokens must follow.
"""

from __future__ import annotations

import copy
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import PreTrainedModel

from tests.model.conftest import hf_logits, random_ids, rel_err
from tests.parallel.scripts import THEN_DIE, THEN_FAIL, run_rank0
from tests.support.hf_gguf import PHI3_MINI_DIMS, make_phi3, write_gguf
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
# llama.cpp's Q4_K_M choices for Phi-3 (quant_mix.py): Q5_K fused qkv, Q6_K head and down.
Q4_K_M = {
    "attn_qkv": Q.Q5_K,
    "attn_output": Q.Q4_K,
    "ffn_up": Q.Q4_K,
    "ffn_down": Q.Q6_K,
    "token_embd": Q.Q4_K,
    "output": Q.Q6_K,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[PreTrainedModel, Path]]:
    """ "bf16" (F32 in the file, bf16 on the GPU) and "q4_k_m" (blocks kept on the GPU), each with
    the transformers model holding the file's values."""
    tmp = tmp_path_factory.mktemp("tp-gpu")
    hf = make_phi3(seed=7, **PHI3_MINI_DIMS)
    quant = copy.deepcopy(hf)
    return {
        "bf16": (hf, write_gguf(hf, tmp / "phi3-mini.gguf")),
        "q4_k_m": (quant, write_gguf(quant, tmp / "q4km.gguf", qtypes=Q4_K_M, sync_model=True)),
    }


@pytest.fixture(scope="module")
def one_gpu(files: dict) -> Iterator[dict[str, Engine]]:
    engines = {
        k: Engine.load(path, device="cuda", max_context=256) for k, (_, path) in files.items()
    }
    yield engines
    del engines
    torch.cuda.empty_cache()


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("kind", ["bf16", "q4_k_m"])
def test_logits_over_gpus_match_one_gpu(
    kind: str, size: int, files: dict, one_gpu: dict[str, Engine]
) -> None:
    if torch.cuda.device_count() < size:
        pytest.skip(f"needs {size} CUDA GPUs")
    hf, path = files[kind]
    one = one_gpu[kind]
    many = Engine.load(path, device="cuda", max_context=256, tensor_parallel_size=size)
    try:
        assert many.runner.graphs is None  # eager over several ranks
        ids = random_ids(29, one.config.vocab_size, seed=2)
        ref = hf_logits(hf, ids)
        single, split = rel_err(one.score(ids), ref), rel_err(many.score(ids), ref)
        assert split < max(1.5 * single, 1e-2), f"TP {size} {split:.4f} vs TP 1 {single:.4f}"
        params = SamplingParams(max_tokens=8, temperature=0.0)
        prompt = ids[:13]
        assert (
            many.generate(prompt, params).token_ids[:2]
            == one.generate(prompt, params).token_ids[:2]
        )
    finally:
        many.runner.close()
    assert [p.exitcode for p in many.runner.group.procs] == [0] * (size - 1)


def test_a_follower_error_in_a_pass_ends_the_pass_on_rank_0(files: dict, tmp_path: Path) -> None:
    """A follower raises inside a pass: rank 0, waiting in an NCCL collective, gets the error (the
    NCCL group is aborted) instead of waiting forever."""
    _, path = files["bf16"]
    done = run_rank0(path, "cuda", tmp_path, THEN_FAIL, failing=True)
    assert "raised: tensor-parallel rank 1 failed in a forward pass" in done.stdout, done.stderr[
        -3000:
    ]


def test_followers_exit_when_rank_0_dies(files: dict, tmp_path: Path) -> None:
    _, path = files["bf16"]
    done = run_rank0(path, "cuda", tmp_path, THEN_DIE)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
