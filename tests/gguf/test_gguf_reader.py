"""GGUFFile on synthetic files (checked against gguf.GGUFReader) and on the real files."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf import GGUFFile, TensorInfo


def _reader_metadata(r: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_matches_reference_reader_on_synthetic_file(write_gguf, tiny_model):
    m = tiny_model()
    rng = np.random.default_rng(1)
    q8 = gguf.quants.quantize(m.tensors["blk.0.ffn_down.weight"], Q.Q8_0)
    m.tensors["blk.0.ffn_down.weight"] = (q8, Q.Q8_0)
    m.tensors["blk.1.attn_q.weight"] = m.tensors["blk.1.attn_q.weight"].astype(np.float16)
    m.tensors["extra.3d"] = rng.standard_normal((3, 5, 32), dtype=np.float32)
    m.metadata |= {"test.flag": True, "test.scores": [0.5, -1.25], "test.name": "héllo ✓"}
    m.metadata |= {"test.empty": "", "test.strings": ["a", "", "ü"], "test.bools": [True, False]}
    path = write_gguf(m)

    ref = gguf.GGUFReader(path)
    with GGUFFile.open(path) as f:
        assert f.version == 3
        assert f.architecture == "qwen2"
        assert dict(f.metadata) == _reader_metadata(ref)
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = f.tensors[t.name]
            assert info.qtype == t.tensor_type
            assert info.shape == tuple(reversed(t.shape.tolist()))
            assert (info.offset, info.n_bytes) == (t.data_offset, t.n_bytes)
            assert np.array_equal(f.raw(t.name), t.data.reshape(-1).view(np.uint8))
        assert f.tensors["extra.3d"].shape == (3, 5, 32)
        assert f.tensors["blk.0.ffn_down.weight"].shape == (64, 96)
        assert torch.equal(f.load("extra.3d"), torch.from_numpy(m.tensors["extra.3d"]))
        half = f.load("blk.1.attn_q.weight", dtype=torch.float16)
        assert half.dtype == torch.float16
        assert torch.equal(half, torch.from_numpy(m.tensors["blk.1.attn_q.weight"]))


def test_nested_arrays_keep_their_structure(write_gguf):
    # The reference reader flattens nested arrays; we keep them as written.
    with GGUFFile.open(write_gguf(metadata={"x.nested": [[1, 2], [3]]})) as f:
        assert f.get("x.nested") == [[1, 2], [3]]


def test_version_2_is_accepted(tiny_model, write_gguf):
    path = write_gguf(tiny_model())
    with open(path, "r+b") as fh:
        fh.seek(4)
        fh.write(struct.pack("<I", 2))
    with GGUFFile.open(path) as f:
        assert f.version == 2
        assert f.load("output_norm.weight").shape == (64,)


def test_raw_is_a_read_only_view_and_load_copies(tiny_model, write_gguf):
    m = tiny_model()
    path = write_gguf(m)
    f = GGUFFile.open(path)
    info = f.tensors["output_norm.weight"]
    raw = f.raw("output_norm.weight")
    assert raw.dtype == np.uint8 and raw.shape == (info.n_bytes,)
    assert not raw.flags.writeable and not raw.flags.owndata
    assert raw.tobytes() == path.read_bytes()[info.offset : info.offset + info.n_bytes]
    w = f.load("output_norm.weight")
    w.add_(1.0)  # a private copy: the file and later loads are untouched
    original = torch.from_numpy(m.tensors["output_norm.weight"])
    assert torch.equal(f.load("output_norm.weight"), original)
    f.close()
    with pytest.raises(ModelLoadError, match="closed"):
        f.load("output_norm.weight")


def test_get_require_and_require_tensor(tiny_model, write_gguf):
    with GGUFFile.open(write_gguf(tiny_model())) as f:
        assert f.get("qwen2.block_count") == 2
        assert f.get("nope", 7) == 7
        assert f.require("qwen2.embedding_length") == 64
        with pytest.raises(ModelLoadError, match="missing required metadata key 'qwen2.nope'"):
            f.require("qwen2.nope")
        info = f.require_tensor("blk.1.ffn_up.weight", (96, 64))
        assert info == TensorInfo("blk.1.ffn_up.weight", Q.F32, (96, 64), 96 * 64 * 4, info.offset)
        with pytest.raises(ModelLoadError, match=r"missing tensor 'blk\.3\.attn_q\.weight'") as e:
            f.require_tensor("blk.3.attn_q.weight")
        assert e.value.code == "MODEL_LOAD_FAILED"
        with pytest.raises(
            ModelLoadError,
            match=r"'blk\.1\.ffn_up\.weight' has shape \(96, 64\) but the config expects "
            r"\(64, 96\)",
        ):
            f.require_tensor("blk.1.ffn_up.weight", (64, 96))


def test_real_qwen_file(qwen_gguf_path: Path):
    start = time.perf_counter()
    f = GGUFFile.open(qwen_gguf_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"opening took {elapsed:.1f}s"  # the reference reader needs ~10 s
    with f:
        assert (f.version, f.architecture, len(f.tensors)) == (3, "qwen2", 291)
        assert f.get("qwen2.block_count") == 24
        tokens = f.get("tokenizer.ggml.tokens")
        assert len(tokens) == 151936 and tokens[0] == "!" and tokens[151645] == "<|im_end|>"
        assert len(f.get("tokenizer.ggml.merges")) == 151387
        assert f.get("tokenizer.ggml.merges")[0] == "Ġ Ġ"
        assert f.get("tokenizer.ggml.add_bos_token") is False
        # Offsets and sizes as gguf.GGUFReader reports them for this file.
        assert f.tensors["token_embd.weight"] == TensorInfo(
            "token_embd.weight", Q.Q5_0, (151936, 896), 93592576, 150590848
        )
        assert f.tensors["output.weight"] == TensorInfo(
            "output.weight", Q.Q8_0, (151936, 896), 144643072, 5947776
        )
        assert f.tensors["blk.0.ffn_down.weight"].shape == (896, 4864)
        assert f.tensors["blk.0.ffn_down.weight"].qtype == Q.Q6_K
        first = ["output.weight", "token_embd.weight", "blk.0.attn_norm.weight"]
        assert list(f.tensors)[:3] == first


def test_vocab_file_metadata_matches_reference_reader(vocab_dir: Path):
    path = vocab_dir / "ggml-vocab-phi-3.gguf"
    with GGUFFile.open(path) as f:
        assert dict(f.metadata) == _reader_metadata(gguf.GGUFReader(path))
        assert f.tensors == {}
