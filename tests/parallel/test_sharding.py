"""Sharding at load, in one process: each rank's parameters are exactly its part of the model.

Every rank r of N is loaded from the file with `Parallel(r, N)` and compared with slices of the
transformers model the file was written from (independent of our loader): q, k, v rows by head
(Qwen's split attn_q/k/v and biases, Phi-3's fused attn_qkv), gate and up rows by FFN unit (Phi-3's
fused ffn_up holds both), o_proj and down_proj columns, embedding and head rows by vocabulary part
(uneven over 3 ranks). Quantized weights keep their blocks where a cut falls on whole blocks and are
dequantized, with a log line, where it does not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import PreTrainedModel

from tests.support.hf_gguf import make_phi3, make_qwen2, write_gguf
from worker_orcd.config import ModelConfig
from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf import GGUFFile
from worker_orcd.kernels.quant.weights import PackedWeight, QuantizedWeight
from worker_orcd.loader import load_model
from worker_orcd.model import CausalLM
from worker_orcd.parallel import Parallel

CPU = torch.device("cpu")
VOCAB = 1001  # over 3 ranks: parts of 334, 334 and 333 rows
# 12 heads, 6 KV heads, FFN 768: whole heads and FFN parts over 2 and 3 ranks.
DIMS: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=96,
    num_attention_heads=12,
    num_key_value_heads=6,
    intermediate_size=768,
    num_hidden_layers=2,
)
# Q8_0 (32-element blocks) on every projection and the embedding; Q4_K (256) on ffn_down. Over 2
# ranks o_proj's 48 and down_proj's 384 columns are not whole blocks; over 3 (32, 256) they are.
QTYPES = {
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q8_0,
    "attn_v": Q.Q8_0,
    "attn_qkv": Q.Q8_0,
    "attn_output": Q.Q8_0,
    "ffn_gate": Q.Q8_0,
    "ffn_up": Q.Q8_0,
    "ffn_down": Q.Q4_K,
    "token_embd": Q.Q8_0,
    "output": Q.Q8_0,
}
MAKERS = {"qwen2": make_qwen2, "phi3": make_phi3}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Any]:
    """(arch, quantized) -> (transformers model holding the file's values, GGUF path)."""
    out: dict[tuple[str, bool], Any] = {}
    for arch, make in MAKERS.items():
        for quantized in (False, True):
            hf = make(seed=5, **DIMS)
            qtypes = {k: v for k, v in QTYPES.items() if _has(arch, k)} if quantized else None
            path = tmp_path_factory.mktemp("shard") / f"{arch}-{quantized}.gguf"
            write_gguf(hf, path, tokenizer=None, qtypes=qtypes, sync_model=quantized)
            out[arch, quantized] = (hf, path)
    return out


def _has(arch: str, key: str) -> bool:
    fused = {"attn_qkv"}
    split = {"attn_q", "attn_k", "attn_v", "ffn_gate"}
    return key not in (split if arch == "phi3" else fused)


def _load(path: Path, parallel: Parallel, weights: str) -> CausalLM:
    with GGUFFile.open(path) as f:
        config = ModelConfig.from_gguf(f)
        model, _ = load_model(
            f,
            config,
            device=CPU,
            dtype=torch.float32,
            max_positions=64,
            weights=weights,
            parallel=parallel,
        )
    return model


def _dense(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a layer computes with: its dense parameter, or its packed parts dequantized."""
    packed: PackedWeight | None = getattr(layer, "quantized", None)
    if packed is None:
        return layer.weight.detach()
    return torch.cat(
        [s.dequantize() if isinstance(s, QuantizedWeight) else s for _, s in packed.parts]
    )


def _part(n: int, p: Parallel) -> slice:
    per = -(-n // p.size)
    return slice(p.rank * per, min(n, (p.rank + 1) * per))


def _expected(hf: PreTrainedModel, arch: str, layer: int, p: Parallel) -> dict[str, torch.Tensor]:
    """Rank p's part of layer `layer`, cut from the transformers weights."""
    cfg = hf.config
    d = cfg.hidden_size // cfg.num_attention_heads
    q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    inter = cfg.intermediate_size
    a, m = hf.model.layers[layer].self_attn, hf.model.layers[layer].mlp
    if arch == "phi3":
        qkv = a.qkv_proj.weight
        q, k, v = qkv[:q_rows], qkv[q_rows : q_rows + kv_rows], qkv[q_rows + kv_rows :]
        gate, up = m.gate_up_proj.weight[:inter], m.gate_up_proj.weight[inter:]
        bias = None
    else:
        q, k, v = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight
        gate, up = m.gate_proj.weight, m.up_proj.weight
        bias = torch.cat(
            [
                a.q_proj.bias[_part(q_rows, p)],
                a.k_proj.bias[_part(kv_rows, p)],
                a.v_proj.bias[_part(kv_rows, p)],
            ]
        )
    out = {
        "qkv": torch.cat([q[_part(q_rows, p)], k[_part(kv_rows, p)], v[_part(kv_rows, p)]]),
        "gate_up": torch.cat([gate[_part(inter, p)], up[_part(inter, p)]]),
        "o": a.o_proj.weight[:, _part(q_rows, p)],
        "down": m.down_proj.weight[:, _part(inter, p)],
    }
    if bias is not None:
        out["qkv_bias"] = bias
    return {k: t.detach() for k, t in out.items()}


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("weights", ["dequantized", "quantized"])
@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_each_rank_holds_its_part(arch: str, weights: str, size: int, files: dict) -> None:
    hf, path = files[arch, weights == "quantized"]
    for rank in range(size):
        p = Parallel(rank, size)
        model = _load(path, p, weights)
        for i, layer in enumerate(model.model.layers):
            want = _expected(hf, arch, i, p)
            attn, mlp = layer.self_attn, layer.mlp
            assert torch.equal(_dense(attn.qkv_proj), want["qkv"]), (rank, i, "qkv")
            assert torch.equal(_dense(mlp.gate_up_proj), want["gate_up"]), (rank, i, "gate_up")
            assert torch.equal(_dense(attn.o_proj), want["o"]), (rank, i, "o_proj")
            assert torch.equal(_dense(mlp.down_proj), want["down"]), (rank, i, "down_proj")
            if "qkv_bias" in want:
                assert torch.equal(attn.qkv_proj.bias, want["qkv_bias"])
            norm = hf.model.layers[i].input_layernorm.weight
            assert torch.equal(layer.input_layernorm.weight, norm.detach())  # whole on every rank
            assert attn.attn.n_heads == 12 // size and attn.attn.n_kv_heads == 6 // size
        rows = _part(VOCAB, p)
        emb, head = model.model.embed_tokens, model.lm_head
        assert torch.equal(_dense(emb), hf.model.embed_tokens.weight[rows].detach())
        assert torch.equal(_dense(head), hf.lm_head.weight[rows].detach())
        assert emb.vocab_range == range(rows.start, rows.stop)


@pytest.mark.parametrize("size", [2, 3])
def test_quantized_cuts_keep_whole_blocks(
    size: int, files: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows are always whole blocks; a column cut keeps its blocks only where it falls on them."""
    _, path = files["qwen2", True]
    with caplog.at_level(logging.INFO, logger="worker_orcd.loader"):
        model = _load(path, Parallel(size - 1, size), "quantized")
    layer = model.model.layers[0]
    for proj in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, model.lm_head):
        assert all(isinstance(s, QuantizedWeight) for _, s in proj.quantized.parts)
    for proj, qtype, cols in (
        (layer.self_attn.o_proj, "Q8_0", 96),
        (layer.mlp.down_proj, "Q4_K", 768),
    ):
        whole = (cols // size) % {"Q8_0": 32, "Q4_K": 256}[qtype] == 0
        if whole:
            ((_, kept),) = proj.quantized.parts
            assert isinstance(kept, QuantizedWeight) and kept.qtype.name == qtype
        else:  # dequantized: a plain dense weight
            assert proj.quantized is None and proj.weight.dtype == torch.float32
        logged = [
            r for r in caplog.records if f"of {cols} are not whole {qtype} blocks" in r.message
        ]
        assert bool(logged) != whole


def test_bad_sizes_name_the_numbers(files: dict) -> None:
    _, path = files["qwen2", False]
    with pytest.raises(ModelLoadError, match=r"size 4 .* but KV heads = 6 is not a multiple of 4"):
        _load(path, Parallel(0, 4), "dequantized")
    with pytest.raises(
        ModelLoadError,
        match=r"size 5 .* but attention heads = 12, KV heads = 6 and FFN size = 768 are not "
        r"multiples of 5",
    ):
        _load(path, Parallel(0, 5), "dequantized")
