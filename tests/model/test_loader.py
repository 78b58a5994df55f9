"""Loader: exact tensor-name tables, shape checks naming both shapes, every parameter filled exactly
once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from worker_orcd.config import ModelConfig
from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf import GGUFFile
from worker_orcd.loader import TABLES, build_model, load_model, plan_load

CPU = torch.device("cpu")


def _load(path: Any) -> torch.nn.Module:
    with GGUFFile.open(path) as f:
        config = ModelConfig.from_gguf(f)
        model, report = load_model(f, config, device=CPU, dtype=torch.float32, max_positions=64)
    assert report.weight_bytes == sum(p.numel() * 4 for p in model.parameters())
    return model


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_every_tensor_lands_in_its_slice(
    arch: str, tiny_model: Callable, write_gguf: Callable
) -> None:
    m = tiny_model(arch)
    model = _load(write_gguf(m))
    params = dict(model.named_parameters())
    t = {k: torch.from_numpy(v) for k, v in m.tensors.items()}
    qkv = params["model.layers.1.self_attn.qkv_proj.weight"]
    gate_up = params["model.layers.1.mlp.gate_up_proj.weight"]
    if arch == "phi3":
        assert torch.equal(qkv, t["blk.1.attn_qkv.weight"])
        assert torch.equal(gate_up, t["blk.1.ffn_up.weight"])
    else:
        q, k, v = (t[f"blk.1.attn_{s}.weight"] for s in "qkv")
        assert torch.equal(qkv, torch.cat([q, k, v]))
        bias = params["model.layers.1.self_attn.qkv_proj.bias"]
        assert torch.equal(bias, torch.cat([t[f"blk.1.attn_{s}.bias"] for s in "qkv"]))
        assert torch.equal(
            gate_up, torch.cat([t["blk.1.ffn_gate.weight"], t["blk.1.ffn_up.weight"]])
        )
    assert torch.equal(params["lm_head.weight"], t["output.weight"])
    assert torch.equal(params["model.layers.0.input_layernorm.weight"], t["blk.0.attn_norm.weight"])


def test_missing_tensor_is_named(tiny_model: Callable, write_gguf: Callable) -> None:
    m = tiny_model("qwen2")
    del m.tensors["blk.1.attn_k.weight"]
    with pytest.raises(ModelLoadError, match=r"missing tensor 'blk\.1\.attn_k\.weight'"):
        _load(write_gguf(m))


def test_wrong_shape_names_both_shapes(tiny_model: Callable, write_gguf: Callable) -> None:
    m = tiny_model("phi3")
    m.tensors["blk.0.ffn_up.weight"] = np.zeros((100, m.hidden), dtype=np.float32)
    with pytest.raises(
        ModelLoadError, match=r"'blk\.0\.ffn_up\.weight' has shape \(100, 64\).*\(192, 64\)"
    ):
        _load(write_gguf(m))


def test_names_match_whole_segments(tiny_model: Callable, write_gguf: Callable) -> None:
    """A qwen2 file with a fused attn_qkv is refused: attn_q must not match attn_qkv by prefix."""
    m = tiny_model("qwen2")
    m.tensors["blk.0.attn_qkv.weight"] = np.zeros((128, m.hidden), dtype=np.float32)
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'blk\.0\.attn_qkv\.weight'"):
        _load(write_gguf(m))
    assert TABLES["qwen2"].target("blk.0.attn_qkv.weight", 2) is None
    assert TABLES["qwen2"].target("blk.0.attn_q.weight.extra", 2) is None
    assert TABLES["qwen2"].target("blk.2.attn_q.weight", 2) is None  # beyond block_count
    assert TABLES["qwen2"].target("blk.1.attn_q.weight", 2) == (
        "model.layers.1.self_attn.qkv_proj.weight",
        "q",
    )


def test_tied_embeddings_without_output_weight(tiny_model: Callable, write_gguf: Callable) -> None:
    m = tiny_model("qwen2")
    del m.tensors["output.weight"]
    model = _load(write_gguf(m))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_parameter_filled_twice_is_refused(tiny_model: Callable, write_gguf: Callable) -> None:
    """A table mapping two tensors onto one parameter fails the exactly-once check."""
    m = tiny_model("phi3")
    path = write_gguf(m)
    with GGUFFile.open(path) as f:
        config = ModelConfig.from_gguf(f)
        model = build_model(config, device=CPU, dtype=torch.float32, max_positions=64)
        table = TABLES["phi3"]
        doubled = type(table)(
            table.globals | {"output.weight": ("model.embed_tokens.weight", None)}, table.block
        )
        TABLES["phi3"] = doubled
        try:
            with pytest.raises(
                ModelLoadError,
                match=r"'output\.weight' loads model\.embed_tokens\.weight a second time",
            ):
                plan_load(f, config, model)
        finally:
            TABLES["phi3"] = table
