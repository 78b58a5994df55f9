"""Each kind of broken file fails to open with a ModelLoadError that names the problem."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from worker_orcd.config import ModelConfig
from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf import GGUFFile


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _tensor_info_offset(path: Path, name: str, n_dims: int) -> int:
    """Byte offset of the u64 data offset in the tensor-table entry of `name`."""
    blob = path.read_bytes()
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = blob.index(key) + len(key)
    assert struct.unpack_from("<I", blob, pos)[0] == n_dims
    return pos + 4 + 8 * n_dims + 4


def _open_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as e:
        GGUFFile.open(path)
    assert e.value.code == "MODEL_LOAD_FAILED"
    assert str(path) in e.value.message
    return e.value.message


@pytest.fixture
def model_file(tiny_model, write_gguf) -> Path:
    return write_gguf(tiny_model())


def test_valid_file_opens(model_file: Path):
    GGUFFile.open(model_file).close()


def test_wrong_magic(model_file: Path):
    _patch(model_file, 0, b"GGML")
    assert "not a GGUF file (bad magic b'GGML'" in _open_error(model_file)


@pytest.mark.parametrize("version", [1, 4, 1000])
def test_unsupported_version(model_file: Path, version: int):
    _patch(model_file, 4, struct.pack("<I", version))
    assert f"unsupported GGUF version {version} (supported: 2, 3)" in _open_error(model_file)


def test_big_endian_file_is_rejected(model_file: Path):
    _patch(model_file, 4, struct.pack(">I", 3))
    assert "big-endian GGUF files are not supported" in _open_error(model_file)


def test_missing_file(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="cannot open model file"):
        GGUFFile.open(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [0, 3, 10, 20, 200])
def test_truncated_header(model_file: Path, keep: int):
    data = model_file.read_bytes()
    model_file.write_bytes(data[:keep])
    assert "truncated file" in _open_error(model_file)


def test_truncated_in_a_string_array(model_file: Path):
    data = model_file.read_bytes()
    cut = data.index(b"t17")  # inside tokenizer.ggml.tokens
    model_file.write_bytes(data[:cut])
    msg = _open_error(model_file)
    assert "truncated file" in msg and "tokenizer.ggml.tokens" in msg


def test_truncated_tensor_data(model_file: Path):
    data = model_file.read_bytes()
    model_file.write_bytes(data[:-100])
    msg = _open_error(model_file)
    assert "truncated file: tensor data ends at byte" in msg
    assert "'output.weight' is cut off" in msg


def test_tensor_data_outside_the_file(model_file: Path):
    pos = _tensor_info_offset(model_file, "blk.0.attn_q.weight", 2)
    _patch(model_file, pos, struct.pack("<Q", 1 << 40))
    msg = _open_error(model_file)
    assert "tensor 'blk.0.attn_q.weight' data [" in msg and "lies outside the file" in msg


def test_misaligned_tensor_offset(model_file: Path):
    pos = _tensor_info_offset(model_file, "blk.0.attn_q.weight", 2)
    (offset,) = struct.unpack_from("<Q", model_file.read_bytes(), pos)
    _patch(model_file, pos, struct.pack("<Q", offset + 4))
    assert "is not a multiple of the alignment 32" in _open_error(model_file)


def test_too_many_tensors(model_file: Path):
    _patch(model_file, 8, struct.pack("<Q", 1 << 20))
    assert "too many tensors: 1048576 (limit 65536)" in _open_error(model_file)


def test_implausible_tensor_count(model_file: Path):
    n = model_file.stat().st_size // 10
    _patch(model_file, 8, struct.pack("<Q", n))
    assert f"too many tensors: a tensor count of {n} is implausible" in _open_error(model_file)


def test_implausible_metadata_count(model_file: Path):
    _patch(model_file, 16, struct.pack("<Q", 1 << 50))
    assert "too many metadata keys" in _open_error(model_file)


def test_huge_string_length(model_file: Path):
    # The first key's length field: claim an exabyte.
    _patch(model_file, 24, struct.pack("<Q", 1 << 60))
    assert "truncated file" in _open_error(model_file)


def test_huge_nested_array_count(write_gguf):
    path = write_gguf(metadata={"x.nested": [[1, 2], [3]]})
    data = path.read_bytes()
    key = b"x.nested"
    # key, u32 ARRAY, u32 item type ARRAY, then the u64 count.
    _patch(path, data.index(key) + len(key) + 8, struct.pack("<Q", 1 << 40))
    assert "truncated file" in _open_error(path)


def test_unknown_value_type(model_file: Path):
    data = model_file.read_bytes()
    key = b"general.architecture"
    pos = data.index(key) + len(key)
    _patch(model_file, pos, struct.pack("<I", 99))
    assert "unknown value type 99 for metadata 'general.architecture'" in _open_error(model_file)


def test_invalid_utf8_key(model_file: Path):
    data = model_file.read_bytes()
    _patch(model_file, data.index(b"general.architecture"), b"\xff")
    assert "is not valid UTF-8" in _open_error(model_file)


def test_missing_architecture_key(model_file: Path):
    data = model_file.read_bytes()
    _patch(model_file, data.index(b"general.architecture"), b"x")  # renames the key
    assert "missing required metadata key 'general.architecture'" in _open_error(model_file)


def test_duplicate_tensor_name(model_file: Path):
    data = model_file.read_bytes()
    pos = data.index(b"blk.1.attn_norm.weight")
    _patch(model_file, pos, b"blk.0")
    assert "duplicate tensor 'blk.0.attn_norm.weight'" in _open_error(model_file)


def test_unknown_ggml_type(model_file: Path):
    pos = _tensor_info_offset(model_file, "output_norm.weight", 1)
    _patch(model_file, pos - 4, struct.pack("<I", 250))
    assert "tensor 'output_norm.weight' has unknown ggml type id 250" in _open_error(model_file)


def test_too_many_dimensions(model_file: Path):
    pos = _tensor_info_offset(model_file, "output_norm.weight", 1)
    _patch(model_file, pos - 4 - 8 - 4, struct.pack("<I", 9))
    assert "tensor 'output_norm.weight' has 9 dimensions" in _open_error(model_file)


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.IQ4_NL, Q.TQ1_0])
def test_unsupported_quant_type(write_gguf, qtype: Q):
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((4, 2 * size), dtype=np.uint8)
    path = write_gguf(metadata={}, tensors={"w.weight": (raw, qtype)})
    msg = _open_error(path)
    assert f"tensor 'w.weight' has unsupported quant type {qtype.name} (supported: F32," in msg
    # Tools that only describe a file can still open it; loading the tensor is refused.
    with GGUFFile.open(path, allow_unsupported_types=True) as f:
        assert f.tensors["w.weight"].shape == (4, 2 * block)
        with pytest.raises(ModelLoadError, match=f"unsupported quant type {qtype.name}"):
            f.load("w.weight")


def test_row_not_a_whole_number_of_blocks(model_file: Path):
    # Relabel an F32 [64] tensor as Q8_0 (blocks of 32): fine. As Q4_K (256): not whole blocks.
    pos = _tensor_info_offset(model_file, "output_norm.weight", 1)
    _patch(model_file, pos - 4, struct.pack("<I", int(Q.Q4_K)))
    assert "rows of 64 values are not a whole number of Q4_K blocks of 256" in _open_error(
        model_file
    )


def test_bad_alignment(write_gguf):
    path = write_gguf(metadata={"general.alignment": 24})
    assert "'general.alignment' must be a non-zero power of two" in _open_error(path)


def test_unknown_architecture(write_gguf, tiny_model):
    m = tiny_model()
    path = write_gguf(arch="gptneox", metadata=m.metadata)
    with GGUFFile.open(path) as f, pytest.raises(ModelLoadError) as e:
        ModelConfig.from_gguf(f)
    assert "unknown architecture 'gptneox' (supported: llama, qwen2, phi3)" in e.value.message


def test_missing_required_key(write_gguf, tiny_model):
    m = tiny_model()
    del m.metadata["qwen2.feed_forward_length"]
    with GGUFFile.open(write_gguf(m)) as f, pytest.raises(ModelLoadError) as e:
        ModelConfig.from_gguf(f)
    assert "missing required metadata key 'qwen2.feed_forward_length'" in e.value.message
