"""The GGUF test-model writer: file contents, checked independently by transformers' loader."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .fixtures import ModelCache
from .gguf_kv import read_metadata
from .hf_gguf import (
    PHI3_MINI_DIMS,
    VOCAB_FILES,
    hf_greedy,
    hf_logits,
    make_phi3,
    make_qwen2,
    vocab_metadata,
    write_gguf,
)
from .vocab import vocab_dir

SMALL_VOCAB = 512  # no tokenizer: keeps the transformers round trip fast


def _ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_reload(path: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def _tensor_table(path: Path) -> dict[str, tuple[tuple[int, ...], Q]]:
    """name -> (shape in torch order, type)."""
    reader = GGUFReader(path)
    return {
        t.name: (tuple(int(d) for d in reversed(t.shape)), Q(t.tensor_type)) for t in reader.tensors
    }


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_file_reloads_in_transformers_with_same_logits(tmp_path: Path, tied: bool) -> None:
    model = make_qwen2(vocab_size=SMALL_VOCAB, tie_word_embeddings=tied)
    path = write_gguf(model, tmp_path / "q.gguf", tokenizer=None)

    table = _tensor_table(path)
    h, kv, f = 64, 2 * 16, 128
    assert table["blk.0.attn_q.weight"] == ((h, h), Q.F32)
    assert table["blk.0.attn_k.weight"] == ((kv, h), Q.F32)
    assert table["blk.3.attn_v.bias"] == ((kv,), Q.F32)
    assert table["blk.3.ffn_gate.weight"] == ((f, h), Q.F32)
    assert table["blk.3.ffn_down.weight"] == ((h, f), Q.F32)
    assert ("output.weight" in table) is not tied
    assert len(table) == 1 + 4 * 12 + 1 + (0 if tied else 1)
    md = read_metadata(path)
    assert md["general.architecture"][0] == "qwen2"
    assert md["qwen2.attention.head_count_kv"][0] == 2
    assert md["qwen2.rope.freq_base"][0] == 1e6
    assert md["qwen2.vocab_size"][0] == SMALL_VOCAB
    assert "qwen2.rope.dimension_count" not in md
    assert not any(k.startswith("tokenizer.") for k in md)

    ids = _ids(40, SMALL_VOCAB)
    expected = hf_logits(model, ids)
    got = hf_logits(_hf_reload(path), ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_phi3_file_reloads_in_transformers_with_same_logits(tmp_path: Path) -> None:
    model = make_phi3(vocab_size=SMALL_VOCAB, num_key_value_heads=2)  # GQA, to check qkv row split
    # transformers' Phi3Config defaults pad_token_id to 32000, outside this small vocab
    pad = {"tokenizer.ggml.padding_token_id": 0}
    path = write_gguf(model, tmp_path / "p.gguf", tokenizer=None, extra_metadata=pad)

    table = _tensor_table(path)
    h, kv, f = 128, 2 * 32, 256
    assert table["blk.0.attn_qkv.weight"] == ((h + 2 * kv, h), Q.F32)
    assert table["blk.0.ffn_up.weight"] == ((2 * f, h), Q.F32)
    assert not any(".attn_q." in n or ".ffn_gate." in n for n in table)
    ffn_up = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
    gate = model.model.layers[0].mlp.gate_up_proj.weight[:f]  # rows: gate then up, as llama.cpp
    np.testing.assert_array_equal(ffn_up.data[:f], gate.detach().numpy())
    md = read_metadata(path)
    assert md["phi3.rope.dimension_count"][0] == 32
    assert md["phi3.rope.scaling.original_context_length"][0] == 4096
    assert "phi3.attention.sliding_window" not in md

    ids = _ids(40, SMALL_VOCAB)
    torch.testing.assert_close(
        hf_logits(_hf_reload(path), ids), hf_logits(model, ids), rtol=1e-5, atol=1e-5
    )


def test_phi3_longrope_and_sliding_window_metadata(tmp_path: Path) -> None:
    model = make_phi3(
        vocab_size=SMALL_VOCAB,
        longrope=True,
        original_max_position_embeddings=64,
        sliding_window=48,
    )
    path = write_gguf(model, tmp_path / "p.gguf", tokenizer=None)
    md = read_metadata(path)
    assert md["phi3.context_length"][0] == 256
    assert md["phi3.rope.scaling.original_context_length"][0] == 64
    assert md["phi3.attention.sliding_window"][0] == 48
    _, hf_attn_factor = ROPE_INIT_FUNCTIONS["longrope"](model.config, torch.device("cpu"))
    assert md["phi3.rope.scaling.attn_factor"][0] == pytest.approx(hf_attn_factor, rel=1e-6)
    assert hf_attn_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    rope = model.config.rope_parameters
    for name, key in (("rope_factors_long", "long_factor"), ("rope_factors_short", "short_factor")):
        name = f"{name}.weight"
        assert Q(tensors[name].tensor_type) == Q.F32
        np.testing.assert_allclose(tensors[name].data, rope[key], rtol=1e-7)


@pytest.mark.parametrize("vocab", ["qwen2", "phi3"])
def test_tokenizer_metadata_is_the_real_vocab(tmp_path: Path, vocab: str) -> None:
    make = make_qwen2 if vocab == "qwen2" else make_phi3
    model = make(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    path = write_gguf(model, tmp_path / "m.gguf")
    written = {k: v for k, v in read_metadata(path).items() if k.startswith("tokenizer.")}
    assert written == vocab_metadata(vocab)
    assert "tokenizer.chat_template" in written
    assert f"{vocab}.vocab_size" not in read_metadata(path)


def test_fast_metadata_reader_agrees_with_gguf_reader() -> None:
    path = vocab_dir() / VOCAB_FILES["phi3"]
    fields = GGUFReader(path).fields
    ours = read_metadata(path)
    assert set(ours) == {k for k in fields if not k.startswith("GGUF.")}
    for key, (value, vtype, *sub) in ours.items():
        assert value == fields[key].contents(), key
        assert [vtype, *sub] == list(fields[key].types), key


def test_vocab_size_must_match_the_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="151936 tokens"):
        write_gguf(make_qwen2(vocab_size=SMALL_VOCAB), tmp_path / "q.gguf")


def test_qtypes_match_whole_segments_and_sync_the_model(tmp_path: Path) -> None:
    model = make_qwen2(vocab_size=SMALL_VOCAB)
    before = model.model.layers[1].mlp.down_proj.weight.clone()
    qtypes = {"ffn_down": Q.Q8_0, "attn_q": Q.Q4_0, "blk.1.attn_q.weight": Q.F16, "output": Q.Q5_1}
    path = write_gguf(model, tmp_path / "q.gguf", tokenizer=None, qtypes=qtypes, sync_model=True)
    table = _tensor_table(path)
    assert table["blk.0.ffn_down.weight"] == ((64, 128), Q.Q8_0)
    assert table["blk.0.attn_q.weight"][1] == Q.Q4_0
    assert table["blk.1.attn_q.weight"][1] == Q.F16  # the full name beats the role
    assert table["blk.0.attn_q.bias"][1] == Q.F32  # 1-D tensors stay F32
    assert table["blk.0.attn_k.weight"][1] == Q.F32
    assert table["output.weight"][1] == Q.Q5_1
    assert table["output_norm.weight"][1] == Q.F32  # "output" is not a segment of output_norm
    assert read_metadata(path)["general.file_type"][0] == gguf.LlamaFileType.ALL_F32

    after = model.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, before, atol=0.02, rtol=0)
    ids = _ids(24, SMALL_VOCAB)
    torch.testing.assert_close(
        hf_logits(_hf_reload(path), ids), hf_logits(model, ids), rtol=1e-5, atol=1e-5
    )


def test_kquants_are_random_blocks_synced_into_the_model(tmp_path: Path) -> None:
    """K-quant tensors hold random valid blocks at the tensor's scale, and the model holds their
    dequantized values, so transformers on the file and on the model agree."""
    model = make_qwen2(vocab_size=SMALL_VOCAB, hidden_size=256, intermediate_size=512)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    qtypes = {"ffn_down": Q.Q6_K, "ffn_up": Q.Q4_K, "attn_q": Q.Q5_K, "token_embd": Q.Q4_K}
    path = write_gguf(model, tmp_path / "k.gguf", tokenizer=None, qtypes=qtypes, sync_model=True)
    table = _tensor_table(path)
    assert table["blk.0.ffn_down.weight"] == ((256, 512), Q.Q6_K)
    assert table["blk.1.attn_q.weight"][1] == Q.Q5_K
    assert table["token_embd.weight"][1] == Q.Q4_K
    after = model.model.layers[0].mlp.down_proj.weight.detach()
    assert torch.isfinite(after).all()
    assert 0.8 < float(after.std() / before.std()) < 1.25
    assert abs(float(torch.corrcoef(torch.stack([after.flatten(), before.flatten()]))[0, 1])) < 0.1
    ids = _ids(16, SMALL_VOCAB)
    torch.testing.assert_close(
        hf_logits(_hf_reload(path), ids), hf_logits(model, ids), rtol=1e-5, atol=1e-5
    )


def test_qtypes_errors(tmp_path: Path) -> None:
    model = make_qwen2(vocab_size=SMALL_VOCAB, num_hidden_layers=1)
    with pytest.raises(ValueError, match="cannot quantize to Q2_K"):
        write_gguf(model, tmp_path / "a.gguf", tokenizer=None, qtypes={"ffn_up": Q.Q2_K})
    with pytest.raises(ValueError, match="Q4_K blocks are random.*sync_model=True"):
        write_gguf(model, tmp_path / "a.gguf", tokenizer=None, qtypes={"ffn_up": Q.Q4_K})
    with pytest.raises(ValueError, match="multiple of 256 values, got 64"):
        write_gguf(
            model, tmp_path / "a.gguf", tokenizer=None, qtypes={"ffn_up": Q.Q6_K}, sync_model=True
        )
    with pytest.raises(ValueError, match="match no quantizable tensor"):
        write_gguf(model, tmp_path / "b.gguf", tokenizer=None, qtypes={"ffn_dow": Q.Q8_0})
    with pytest.raises(ValueError, match="match no quantizable tensor"):
        write_gguf(model, tmp_path / "c.gguf", tokenizer=None, qtypes={"attn_norm": Q.Q8_0})


def test_logits_are_well_scaled_and_greedy_tokens_vary() -> None:
    for model, vocab in ((make_qwen2(vocab_size=4096), 4096), (make_phi3(vocab_size=4096), 4096)):
        logits = hf_logits(model, _ids(32, vocab))
        assert 0.3 < float(logits.std()) < 10
        assert len(set(logits.argmax(-1).tolist())) >= 16
        assert len(set(hf_greedy(model, _ids(8, vocab), 16))) >= 4


def test_models_are_seeded() -> None:
    a, b, c = make_phi3(vocab_size=64), make_phi3(vocab_size=64), make_phi3(vocab_size=64, seed=1)
    ids = _ids(8, 64)
    assert torch.equal(hf_logits(a, ids), hf_logits(b, ids))
    assert not torch.equal(hf_logits(a, ids), hf_logits(c, ids))


def test_phi3_mini_dims_match_the_real_phi3_metadata() -> None:
    md = read_metadata(vocab_dir() / VOCAB_FILES["phi3"])
    assert PHI3_MINI_DIMS["hidden_size"] == md["phi3.embedding_length"][0]
    assert PHI3_MINI_DIMS["num_attention_heads"] == md["phi3.attention.head_count"][0]
    assert PHI3_MINI_DIMS["num_key_value_heads"] == md["phi3.attention.head_count_kv"][0]
    assert PHI3_MINI_DIMS["intermediate_size"] == md["phi3.feed_forward_length"][0]


def test_model_cache_builds_once(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    a = cache.get("qwen2", tokenizer=None, vocab_size=64, num_hidden_layers=1)
    assert cache.get("qwen2", tokenizer=None, vocab_size=64, num_hidden_layers=1) is a
    b = cache.get("qwen2", tokenizer=None, vocab_size=64, num_hidden_layers=2)
    assert b.path != a.path and b.config.num_hidden_layers == 2
    assert GGUFReader(a.path).fields["qwen2.block_count"].contents() == 1
