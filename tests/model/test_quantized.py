"""weights="quantized": GGUF blocks kept in the layers against the dequantized path.

On the CPU the quantized layers (CpuPackedWeight over the file's memory map) run the compiled CPU
kernels (kernels/cpu), which use the exactly dequantized weights but round x to int8 per 32
elements, as the GPU GEMVs do: logits move by ~1% of their norm on these random models, so the
bound here is 3e-2 (a misplaced shard or block would be off by O(1)), and greedy tokens are
float32's choice unless float32 itself puts them near a tie.

The GPU test runs the fused Triton kernels in bf16 against the dequantized float32 CPU path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from tests.model.conftest import prefill_then_decode, random_ids, rel_err
from tests.support.hf_gguf import make_qwen2, write_gguf
from worker_orcd.config import ModelConfig
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import SamplingParams
from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf import GGUFFile
from worker_orcd.kernels.cpu.weights import CpuPackedWeight, CpuQuantizedWeight
from worker_orcd.kernels.quant.ops import int8_x_reference
from worker_orcd.loader import TABLES, load_model

CPU = torch.device("cpu")
# Qwen2 at hidden 64 (32-element blocks): a different legacy type per q/k/v shard, so qkv_proj packs
# three parts; the embedding is Q5_0 and the head Q8_0 as in Qwen2.5's own Q4_K_M files.
LEGACY = {
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q8_0,
    "attn_v": Q.Q5_0,
    "attn_output": Q.Q8_0,
    "ffn_gate": Q.Q5_0,
    "ffn_up": Q.Q5_0,
    "ffn_down": Q.Q4_0,
    "token_embd": Q.Q5_0,
    "output": Q.Q8_0,
}
# Every type the quantized kernels keep (K-quants need rows of 256: hidden 256, FFN 512).
ALL_TYPES = {
    "attn_q": Q.Q4_K,
    "attn_k": Q.Q5_0,
    "attn_v": Q.Q6_K,
    "attn_output": Q.Q5_K,
    "ffn_gate": Q.Q4_K,
    "ffn_up": Q.Q4_0,
    "ffn_down": Q.Q6_K,
    "blk.1.ffn_down": Q.Q5_K,
    "token_embd": Q.Q5_0,
    "output": Q.Q8_0,
}
KQUANT_DIMS: dict[str, Any] = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2)
REL_TOL_CPU = 3e-2
NEAR_TIE = 0.15  # float32 logit gap under which an int8-rounded path may pick the other token


@pytest.fixture(scope="module")
def legacy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = make_qwen2(num_hidden_layers=2)
    path = tmp_path_factory.mktemp("quant") / "legacy.gguf"
    return write_gguf(hf, path, qtypes=LEGACY, sync_model=True)


@pytest.fixture(scope="module")
def all_types_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = make_qwen2(seed=3, **KQUANT_DIMS)
    path = tmp_path_factory.mktemp("quant") / "all_types.gguf"
    return write_gguf(hf, path, qtypes=ALL_TYPES, sync_model=True)


def _file_bytes(path: Path) -> dict[str, int]:
    with GGUFFile.open(path) as f:
        out: dict[str, int] = {}
        for t in f.tensors.values():
            out[t.qtype.name] = out.get(t.qtype.name, 0) + t.n_bytes
    return out


def test_quantized_logits_match_dequantized_cpu(legacy_file: Path) -> None:
    quant = Engine.load(legacy_file, max_context=128, weights="quantized")
    dense = Engine.load(legacy_file, max_context=128, weights="dequantized")
    qkv = quant.model.model.layers[0].self_attn.qkv_proj
    assert [p.qtype.name for _, p in qkv.quantized.parts] == ["Q4_0", "Q8_0", "Q5_0"]
    assert qkv.weight.is_meta and not dense.model.model.layers[0].self_attn.qkv_proj.weight.is_meta
    ids = random_ids(21, quant.config.vocab_size, seed=1)
    ref = dense.score(ids)
    assert rel_err(quant.score(ids), ref) < REL_TOL_CPU
    # decode steps take the one-row (GEMV) branch of every quantized matmul
    assert rel_err(prefill_then_decode(quant, ids[:15], ids[15:]), ref) < REL_TOL_CPU


def test_info_reports_quantized_bytes_on_the_device(legacy_file: Path) -> None:
    engine = Engine.load(legacy_file, max_context=128, weights="quantized")
    info = engine.info()
    on_file = _file_bytes(legacy_file)
    assert info.weights == "quantized"
    for qtype in ("Q4_0", "Q5_0", "Q8_0"):  # blocks keep their bytes on the device
        assert info.weight_mix[qtype] == on_file[qtype]
    assert info.weight_mix["float32"] == on_file["F32"]  # norms and biases
    assert info.weight_bytes == sum(info.weight_mix.values())
    assert info.weight_bytes == sum(on_file.values())
    dense = Engine.load(legacy_file, max_context=128, weights="dequantized").info()
    assert dense.weights == "dequantized" and set(dense.weight_mix) == {"float32"}
    assert dense.weight_bytes > 3 * info.weight_bytes


def test_weights_mode_is_checked(legacy_file: Path) -> None:
    with pytest.raises(ModelLoadError, match="weights='int4'"):
        Engine.load(legacy_file, weights="int4")
    with GGUFFile.open(legacy_file) as f:
        config = ModelConfig.from_gguf(f)
        with pytest.raises(ValueError, match="weights must be one of quantized, dequantized"):
            load_model(f, config, device=CPU, dtype=torch.float32, max_positions=8, weights="q")


def test_kquant_file_greedy_and_logits_match_dequantized_cpu(all_types_file: Path) -> None:
    """Every supported type in one file, through the CPU kernels: greedy tokens and logits of the
    dequantized float32 path, up to the rounding of x."""
    quant = Engine.load(all_types_file, max_context=128, weights="quantized")
    dense = Engine.load(all_types_file, max_context=128, weights="dequantized")
    assert set(quant.info().weight_mix) == {
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q4_0",
        "Q5_0",
        "Q8_0",
        "float32",
    }
    prompt = random_ids(9, quant.config.vocab_size, seed=2)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    got = quant.generate(prompt, params).token_ids
    ids = prompt + got
    ref = dense.score(ids)
    for i, token in enumerate(got):  # float32's argmax on the quantized path's own prefix
        step = ref[len(prompt) - 1 + i]
        assert float(step.max() - step[token]) < NEAR_TIE, f"step {i}"
    assert rel_err(quant.score(ids), ref) < REL_TOL_CPU


# -- loader: exactly-once checks and placement with quantized shards ------------------------------


def _quantized_tiny(tiny_model: Callable, arch: str) -> Any:
    """The loader tests' tiny model with every 2-D weight quantized (alternating Q8_0 / Q4_0)."""
    m = tiny_model(arch)
    for i, (name, t) in enumerate(list(m.tensors.items())):
        if t.ndim == 2 and name != "blk.0.attn_k.weight":  # one shard stays F32
            qtype = (Q.Q8_0, Q.Q4_0)[i % 2]
            m.tensors[name] = (quants.quantize(t, qtype), qtype)
    return m


def _load(path: Path, weights: str) -> tuple[torch.nn.Module, Any]:
    with GGUFFile.open(path) as f:
        config = ModelConfig.from_gguf(f)
        return load_model(
            f, config, device=CPU, dtype=torch.float32, max_positions=64, weights=weights
        )


def _dense_of(t: Any) -> torch.Tensor:
    if isinstance(t, tuple):
        return torch.from_numpy(np.ascontiguousarray(quants.dequantize(t[0], t[1])))
    return torch.from_numpy(t)


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_quantized_shards_land_in_their_rows(
    arch: str, tiny_model: Callable, write_gguf: Callable
) -> None:
    m = _quantized_tiny(tiny_model, arch)
    model, report = _load(write_gguf(m), "quantized")
    t = {k: _dense_of(v) for k, v in m.tensors.items()}
    layer = model.model.layers[0]
    if arch == "qwen2":
        want = torch.cat([t[f"blk.0.attn_{s}.weight"] for s in "qkv"])
        kinds = [type(p).__name__ for _, p in layer.self_attn.qkv_proj.quantized.parts]
        assert kinds == ["CpuQuantizedWeight", "Tensor", "CpuQuantizedWeight"]  # k stayed F32
    else:
        want = t["blk.0.attn_qkv.weight"]
    packed = layer.self_attn.qkv_proj.quantized
    assert isinstance(packed, CpuPackedWeight)
    # rows of the identity round to int8 exactly (one 1.0 each); in slices of 16, under the rows
    # from which prompts take the bfloat16 path
    x = torch.eye(m.hidden)
    got = torch.cat([packed.matmul(x[i : i + 16]) for i in range(0, m.hidden, 16)])
    torch.testing.assert_close(got.T, want, rtol=0, atol=1e-6)
    emb = model.model.embed_tokens.quantized.parts[0][1]
    assert isinstance(emb, CpuQuantizedWeight)
    torch.testing.assert_close(emb.dequantize(), t["token_embd.weight"], rtol=0, atol=0)
    assert model.model.norm.weight.device == CPU  # 1-D tensors stay dense parameters
    assert report.weight_bytes == sum(report.weight_mix.values())


def test_all_dense_placeholder_becomes_a_parameter(
    tiny_model: Callable, write_gguf: Callable
) -> None:
    """weights="quantized" on an F32 file: every placeholder becomes a real dense parameter, and a
    tied head shares it."""
    m = tiny_model("qwen2")
    del m.tensors["output.weight"]
    model, report = _load(write_gguf(m), "quantized")
    assert not any(p.is_meta for p in model.parameters())
    assert all(getattr(mod, "quantized", None) is None for mod in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, torch.from_numpy(m.tensors["token_embd.weight"]))
    assert report.weight_mix == {"float32": sum(p.numel() * 4 for p in model.parameters())}


def test_tied_head_shares_the_quantized_embedding(
    tiny_model: Callable, write_gguf: Callable
) -> None:
    m = _quantized_tiny(tiny_model, "qwen2")
    del m.tensors["output.weight"]
    model, report = _load(write_gguf(m), "quantized")
    assert model.lm_head.quantized is model.model.embed_tokens.quantized
    emb = model.model.embed_tokens.quantized
    assert report.weight_mix[emb.parts[0][1].qtype.name] >= emb.nbytes  # counted once
    hidden = torch.randn(3, m.hidden, generator=torch.Generator().manual_seed(0))
    want = int8_x_reference(hidden) @ _dense_of(m.tensors["token_embd.weight"]).T
    torch.testing.assert_close(model.compute_logits(hidden), want, rtol=1e-5, atol=1e-5)


def test_missing_quantized_shard_is_named(tiny_model: Callable, write_gguf: Callable) -> None:
    m = _quantized_tiny(tiny_model, "qwen2")
    del m.tensors["blk.1.ffn_up.weight"]
    with pytest.raises(ModelLoadError, match=r"missing tensor 'blk\.1\.ffn_up\.weight'"):
        _load(write_gguf(m), "quantized")


def test_quantized_parameter_filled_twice_is_refused(
    tiny_model: Callable, write_gguf: Callable
) -> None:
    m = _quantized_tiny(tiny_model, "phi3")
    path = write_gguf(m)
    table = TABLES["phi3"]
    TABLES["phi3"] = type(table)(
        table.globals | {"output.weight": ("model.embed_tokens.weight", None)}, table.block
    )
    try:
        with pytest.raises(
            ModelLoadError, match=r"'output\.weight' loads model\.embed_tokens\.weight a second"
        ):
            _load(path, "quantized")
    finally:
        TABLES["phi3"] = table


# -- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kquant_file_quantized_gpu_matches_dequantized_cpu(all_types_file: Path) -> None:
    """Fused kernels in bf16 on the GPU against the dequantized float32 CPU path: the first greedy
    tokens agree, every later one is float32's argmax unless float32 puts it within bf16 rounding
    of a tie, and logits are within 3% relative (bf16 activations alone give ~1% here)."""
    gpu = Engine.load(all_types_file, device="cuda", max_context=256)
    cpu = Engine.load(all_types_file, max_context=256, weights="dequantized")
    info, on_file = gpu.info(), _file_bytes(all_types_file)
    assert info.weights == "quantized" and cpu.info().weights == "dequantized"
    for qtype in ("Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0"):
        assert info.weight_mix[qtype] == on_file[qtype]
    assert 2 * info.weight_mix["bfloat16"] == on_file["F32"]  # norms and biases in bf16
    prompt = random_ids(11, cpu.config.vocab_size, seed=7)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    want = cpu.generate(prompt, params).token_ids
    got = gpu.generate(prompt, params).token_ids
    assert got[:3] == want[:3]
    ids = prompt + got[:-1]
    ref = cpu.score(ids)
    assert rel_err(gpu.score(ids), ref) < 3e-2
    steps = ref[len(prompt) - 1 :]
    for i, token in enumerate(got):
        best = int(steps[i].argmax())
        gap = float(steps[i, best] - steps[i, token])
        assert gap < 0.15, f"step {i}: GPU took {token}, float32 prefers {best} by {gap:.3f}"
    # decode steps run the fused GEMV, the prompt dequantize + cuBLAS (more than 3 rows)
    stepped = prefill_then_decode(gpu, ids[:8], ids[8:]).cpu()
    assert rel_err(stepped, ref) < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_cuda_graphs_match_eager(all_types_file: Path) -> None:
    """Decode and prompt graphs captured over quantized layers (fused GEMV in the decode graph,
    dequantize into the scratch weight + cuBLAS in the prompt graphs) replay what eager computes."""
    eager = Engine.load(all_types_file, device="cuda", max_context=256, cuda_graphs=False)
    graphs = Engine.load(all_types_file, device="cuda", max_context=256)  # graphs by default
    if graphs.runner.graphs is None:
        pytest.skip("CUDA graphs unavailable (no Triton)")
    ids = random_ids(30, eager.config.vocab_size, seed=8)
    whole = eager.score(ids)
    stepped = prefill_then_decode(graphs, ids[:12], ids[12:]).cpu()
    assert rel_err(stepped, whole) < 2e-2
